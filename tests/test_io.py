"""dinolab.io: atomic writers follow the umask, and JSON output is strict (no NaN / inf)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from dinolab.errors import DinolabError
from dinolab.io import atomic_write, atomic_write_json, atomic_write_text, json_safe, unique_output_names


@pytest.fixture
def umask():
    """Set the process umask for a test; restore it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    umask(0o022)
    assert _mode(atomic_write_json(tmp_path / "a.json", {"x": 1})) == 0o644  # was 0o600 (mkstemp's)
    assert _mode(atomic_write_text(tmp_path / "b.txt", "hi")) == 0o644
    assert _mode(atomic_write(tmp_path / "c.bin", lambda f: f.write(b"\0"))) == 0o644
    umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "d.txt", "private")) == 0o600
    umask(0o002)
    assert _mode(atomic_write_text(tmp_path / "b.txt", "group")) == 0o664  # a replaced file too


def test_json_refuses_nan_and_inf_naming_the_file_and_key(tmp_path):
    out = tmp_path / "search.json"
    with pytest.raises(DinolabError, match=r"search\.json.*\[0\]\.neighbours\[1\]\.score"):
        atomic_write_json(out, [{"query": "q", "neighbours": [{"score": 0.5}, {"score": float("nan")}]}])
    with pytest.raises(DinolabError, match="non-finite"):
        atomic_write_json(out, {"v": np.float32("inf")})
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_json_safe_turns_undefined_metrics_into_null(tmp_path):
    res = {"miou": 12.5, "per_class_iou": {"road": 40.0, "absent": float("nan")}, "rows": [1, (float("inf"),)]}
    path = atomic_write_json(tmp_path / "r.json", json_safe(res))
    assert json.loads(path.read_text()) == {"miou": 12.5, "per_class_iou": {"road": 40.0, "absent": None},
                                            "rows": [1, [None]]}


def test_output_names_are_unique_and_stay_inside_the_folder():
    ids = ["ok.bmp", "ok.tiff", "ok.webp", "a/x.jpg", "b/x.jpg", "/data/q/y.jpg", "/data/r/y.jpg", "/t/solo.png",
           "../../etc/passwd", "line\nbreak.png", ".hidden.png", "OK.bmp"]
    names = unique_output_names(ids, ".png")
    assert names[:5] == ["ok.bmp.png", "ok.tiff.png", "ok.webp.png", "a/x.jpg.png", "b/x.jpg.png"]
    assert names[5:9] == ["q/y.jpg.png", "r/y.jpg.png", "solo.png.png", "passwd.png"]  # just enough folders
    assert names[9] == "line_break.png.png" and names[10] == "_.hidden.png.png" and names[11] == "OK.bmp~2.png"
    assert len({n.lower() for n in names}) == len(names)
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
