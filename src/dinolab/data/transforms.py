"""Image preprocessing: the official evaluation transform and a dense-task transform.

The evaluation transform is DINOv2's: resize the short side to 256 (bicubic), centre-crop 224,
ImageNet mean/std. The dense transform keeps the aspect ratio and rounds each side to a multiple
of the patch size, so any image can go through the backbone without a silent crop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor() -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def make_classification_transform(resize: int = 256, crop: int = 224) -> v2.Compose:
    """Official evaluation preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return v2.Compose([
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(crop),
        *_to_normalized_tensor(),
    ])


def dense_size(height: int, width: int, patch_size: int, short_side: int | None) -> tuple[int, int]:
    """Output (H, W) of the dense transform: short side scaled to ``short_side`` (None keeps the
    scale), aspect ratio kept, each side rounded to the nearest patch multiple (at least one patch)."""
    scale = 1.0 if short_side is None else short_side / min(height, width)
    return tuple(max(patch_size, round(s * scale / patch_size) * patch_size) for s in (height, width))


def make_dense_transform(patch_size: int = 14, short_side: int | None = 448) -> Callable[[Image.Image], Tensor]:
    """Transform for dense tasks and PCA: keep the aspect ratio, resize so the short side is about
    ``short_side`` and both sides are multiples of ``patch_size`` (the aspect ratio changes by at
    most half a patch per side), then normalise. Returns (3, H, W) float tensors."""
    tail = v2.Compose(_to_normalized_tensor())

    def transform(img: Image.Image) -> Tensor:
        h, w = dense_size(img.height, img.width, patch_size, short_side)
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        return tail(img)

    return transform


def fit_to_patch(x: Tensor, patch_size: int, mode: Literal["crop", "pad"] = "crop") -> Tensor:
    """Make the last two dims of ``x`` multiples of ``patch_size``.

    ``crop`` drops the remainder at the bottom/right (what the official dense evaluations do);
    ``pad`` zero-pads bottom/right (zero is the dataset mean after normalisation).
    """
    h, w = x.shape[-2:]
    if mode == "crop":
        return x[..., : h - h % patch_size, : w - w % patch_size]
    if mode == "pad":
        return F.pad(x, (0, -w % patch_size, 0, -h % patch_size))
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
