"""Every ``dinolab.models...`` name the README mentions exists (issue 12: ``save_hf_folder`` was
documented next to ``dinolab.models.save_official`` but importable only from ``models.checkpoints``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


NAMES = sorted(set(re.findall(r"dinolab\.models(?:\.\w+)+", README.read_text())))


def test_readme_mentions_some_names():
    assert "dinolab.models.save_official" in NAMES


@pytest.mark.parametrize("dotted", NAMES)
def test_readme_models_name_exists(dotted):
    _resolve(dotted)


def test_saving_paragraph_names_import_from_dinolab_models():
    from dinolab.models import save_hf_folder, save_official  # the README's "Saving" paragraph
    from dinolab.models.convert import hf_to_official, official_to_hf, official_to_timm, timm_to_official

    assert all(map(callable, (save_hf_folder, save_official, hf_to_official, official_to_hf,
                              official_to_timm, timm_to_official)))
