"""The embedded default model: a small backbone pretrained by dinolab itself, shipped in the package.

``src/dinolab/assets/embedded/`` holds a ViT-Tiny/8 (6 blocks, fp16 safetensors + architecture
sidecar), a CamVid linear segmentation head and a 7-Scenes linear depth head trained on its frozen
features, ``model.json`` (file hashes, measured numbers) and ``MODEL_CARD.md`` (training command,
data, licence notes). ``./serve.sh`` and ``./demo.sh`` use it when the official weights are neither
cached nor downloadable, so the first start needs no training and no network. It is a demo model,
far below the official DINOv2 ViT-S/14; ``benchmarks/embedded_model.py`` rebuilds it.

Example::

    from dinolab.models.embedded import load_embedded
    model = load_embedded()            # also: dinolab.load_model("dinolab_embedded_vitt8")
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dinolab.errors import DinolabError

EMBEDDED_NAME = "dinolab_embedded_vitt8"
BACKBONE_FILE = "backbone.safetensors"
SEG_HEAD_FILE = "seg_camvid_linear.pth"
DEPTH_HEAD_FILE = "depth_7scenes_lin1.pth"
SHORT_SIDE = 224  # inference short side in px for the demo (28 patches of 8 px)


def embedded_dir() -> Path:
    """The folder of the embedded model's files inside the installed package."""
    return Path(str(resources.files("dinolab") / "assets" / "embedded"))


def _asset(name: str) -> Path:
    path = embedded_dir() / name
    if not path.is_file():
        raise DinolabError(f"the embedded model file {path} is missing: reinstall dinolab from a full "
                           "checkout (the file is in the repository) or rebuild it with "
                           "`python benchmarks/embedded_model.py`")
    return path


def embedded_backbone_path() -> Path:
    """Path of the embedded backbone (fp16 safetensors in the official key layout)."""
    return _asset(BACKBONE_FILE)


def embedded_seg_head_path() -> Path:
    """Path of the CamVid linear segmentation head trained on the embedded backbone."""
    return _asset(SEG_HEAD_FILE)


def embedded_depth_head_path() -> Path:
    """Path of the 7-Scenes linear (``lin1``) depth head trained on the embedded backbone."""
    return _asset(DEPTH_HEAD_FILE)


@lru_cache(maxsize=1)
def embedded_info() -> dict[str, Any]:
    """``model.json``: architecture, file sizes and SHA-256, training command and measured numbers."""
    return json.loads(_asset("model.json").read_text())


def backbone_sha256() -> str:
    """The SHA-256 of the backbone file that ``model.json`` records (checked on every load)."""
    return embedded_info()["files"][BACKBONE_FILE]["sha256"]


def load_embedded(device: str | torch.device | None = None) -> torch.nn.Module:
    """The embedded backbone in fp32, eval mode, its file checked against ``model.json``'s SHA-256."""
    from dinolab.models.checkpoints import load_model

    return load_model(EMBEDDED_NAME, device=device)


def describe() -> str:
    """One phrase saying what the embedded model is, with its measured numbers, for notices."""
    info = embedded_info()
    a, seg, depth = info["architecture"], info["segmentation"], info["depth"]
    knn = info["knn"].get("tinyimagenet190/embedded", {}).get("top1", {}).get("20")
    knn_txt = f"Tiny-ImageNet-190 kNN {knn:.1f}%, " if knn is not None else ""
    return (f"dinolab's embedded model (ViT-Tiny/{a['patch_size']}, {a['depth']} blocks, self-supervised on "
            f"~130k small natural images on a CPU; {knn_txt}CamVid mIoU {seg['miou']:.1f}, "
            f"7-Scenes RMSE {depth['rmse']:.2f} m)")
