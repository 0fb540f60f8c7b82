"""Image preprocessing: the official evaluation transform and a dense-task transform.

The evaluation transform is DINOv2's: resize the short side to 256 (bicubic), centre-crop 224,
ImageNet mean/std. The dense transform keeps the aspect ratio and rounds each side to a multiple
of the patch size, so any image can go through the backbone without a silent crop; its long side is
capped at ``MAX_LONG_SIDE_FACTOR`` times the short-side target (the web server's rule too), so a
1 x 5000 px strip cannot become a 448 x 2,240,000 px input.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LONG_SIDE_FACTOR = 2  # dense inputs: long side <= this x the short-side target (CLI and server alike)

log = logging.getLogger(__name__)


def _to_normalized_tensor() -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def make_classification_transform(resize: int = 256, crop: int = 224) -> v2.Compose:
    """Official evaluation preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return v2.Compose([
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(crop),
        *_to_normalized_tensor(),
    ])


def dense_size(height: int, width: int, patch_size: int, short_side: int | None,
               max_side: int | None = None) -> tuple[int, int]:
    """Output (H, W) of the dense transform: short side scaled to ``short_side`` (None keeps the
    scale), aspect ratio kept, each side rounded to the nearest patch multiple (at least one patch).

    The long side is capped at ``max_side`` (default ``MAX_LONG_SIDE_FACTOR * short_side``; no cap
    when both are None), shrinking the short side with it; a capped image is logged."""
    scale = 1.0 if short_side is None else short_side / min(height, width)
    if max_side is None and short_side is not None:
        max_side = MAX_LONG_SIDE_FACTOR * short_side
    if max_side is not None and scale * max(height, width) > max_side:
        scale = max_side / max(height, width)
        log.info("image %dx%d: long side capped at %d px (short side ~%d px instead of %s)", width, height,
                 max_side, round(scale * min(height, width)), short_side)
    return tuple(max(patch_size, round(s * scale / patch_size) * patch_size) for s in (height, width))


def make_dense_transform(patch_size: int = 14, short_side: int | None = 448,
                         max_side: int | None = None) -> Callable[[Image.Image], Tensor]:
    """Transform for dense tasks and PCA: keep the aspect ratio, resize so the short side is about
    ``short_side`` and both sides are multiples of ``patch_size`` (the aspect ratio changes by at
    most half a patch per side), the long side capped as in :func:`dense_size`, then normalise.
    Returns (3, H, W) float tensors."""
    tail = v2.Compose(_to_normalized_tensor())

    def transform(img: Image.Image) -> Tensor:
        h, w = dense_size(img.height, img.width, patch_size, short_side, max_side)
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


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return getattr(v, "value", None) or str(v).removeprefix("torch.")  # enums (InterpolationMode), dtypes


_STEP_FIELDS = {"Resize": ("size", "interpolation", "max_size", "antialias"), "CenterCrop": ("size",),
                "Normalize": ("mean", "std"), "ToDtype": ("dtype", "scale"), "ToImage": ()}


def describe_transform(transform: Callable) -> dict[str, Any]:
    """A JSON-friendly description of a (``v2.Compose`` of) torchvision transform(s): ``steps`` (one
    dict per step: ``op`` and its settings) plus, when present, ``resize`` (short side), ``crop``,
    ``interpolation``, ``mean`` and ``std`` at the top level. Steps of other types keep their repr
    (without memory addresses)."""
    steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    out: dict[str, Any] = {"steps": []}
    for t in steps:
        name = type(t).__name__
        if name in _STEP_FIELDS:
            step = {"op": name, **{f: _jsonable(getattr(t, f, None)) for f in _STEP_FIELDS[name]}}
        else:
            step = {"op": name, "repr": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(t))}
        out["steps"].append(step)
        size = step.get("size")
        if name == "Resize" and isinstance(size, list) and len(size) == 1:
            out.update(resize=size[0], interpolation=step["interpolation"])
        elif name == "CenterCrop" and isinstance(size, list) and len(set(size)) == 1:
            out["crop"] = size[0]
        elif name == "Normalize":
            out.update(mean=step["mean"], std=step["std"])
    return out
