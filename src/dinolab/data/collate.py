"""Collate multi-crop samples into one training batch with iBOT masks (official ``collate_data_and_cast``).

A sample is the dict returned by ``MultiCropAugmentation`` (``{"global": [2 x (3, G, G)],
"local": [n_local x (3, L, L)]}``), or an ``(index, dict)`` pair when the dataset also returns its
index. With B samples, N = h * w patches per global crop and M masked patches in the batch,
``collate_multicrop`` returns:

==================  ======================  =======================================================
key                 shape / type            meaning
==================  ======================  =======================================================
global_crops        (2B, 3, G, G) float     view-major: rows 0..B-1 are every image's first global
                                            crop, rows B..2B-1 every image's second
local_crops         (n_local*B, 3, L, L)    view-major: local view 0 of all images, then view 1 ...;
                                            an empty tensor when n_local = 0
masks               (2B, N) bool            iBOT block mask of each global crop (row-major patches);
                                            half of the rows (``mask_probability``) are non-empty
mask_indices        (M,) int64              ``masks.flatten().nonzero()``: flat indices into the
                                            (2B * N) patch tokens of the global crops
masks_weight        (M,) float32            for each masked patch, 1 / (masked patches of its image),
                                            so the weights of one masked image sum to 1
n_masked_patches    (1,) int64              M, as a tensor (as the official collate returns it)
upperbound          int                     most masked patches this scheme can give a batch of this
                                            size: pad ``mask_indices`` to it for static shapes
indices             (B,) int64              dataset indices, only when samples are (index, dict)
==================  ======================  =======================================================

Use it as ``DataLoader(..., collate_fn=functools.partial(collate_multicrop, grid=(16, 16)))``.
Leave ``rng=None`` there: each call then seeds a numpy generator from torch's generator, which the
``DataLoader`` seeds per worker and per epoch. A ``numpy.random.Generator`` bound with ``partial``
would be copied into every worker with the same state, giving every worker the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinolab.data.masking import BlockMaskGenerator, sample_batch_masks

Sample = Mapping[str, Sequence[Tensor]] | tuple[int, Mapping[str, Sequence[Tensor]]]


def _split_samples(samples: Sequence[Sample]) -> tuple[list[Mapping[str, Sequence[Tensor]]], Tensor | None]:
    """Views of each sample, and the dataset indices when samples are (index, views) pairs."""
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    if isinstance(samples[0], Mapping):
        return list(samples), None  # type: ignore[arg-type]
    indices = torch.tensor([int(index) for index, _ in samples], dtype=torch.long)
    return [views for _, views in samples], indices


def _stack_view_major(views: list[Mapping[str, Sequence[Tensor]]], key: str) -> Tensor:
    """(n_views * B, 3, S, S): view 0 of every image, then view 1, ... (the official order)."""
    n_views = len(views[0][key])
    if any(len(v[key]) != n_views for v in views):
        raise ValueError(f"all samples must have the same number of {key!r} crops")
    if n_views == 0:
        return torch.empty(0)
    return torch.stack([v[key][i] for i in range(n_views) for v in views])


def _check_grid(global_crops: Tensor, grid: tuple[int, int]) -> None:
    size_h, size_w = global_crops.shape[-2:]
    if size_h % grid[0] or size_w % grid[1]:
        raise ValueError(
            f"global crops of {size_h}x{size_w} px do not split into a {grid[0]}x{grid[1]} patch grid; "
            f"pass grid=(G // patch_size, G // patch_size)"
        )


def _torch_seeded_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's generator (per-worker seeded by ``DataLoader``)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def collate_multicrop(
    samples: Sequence[Sample],
    *,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    rng: np.random.Generator | None = None,
    generator: BlockMaskGenerator | None = None,
) -> dict[str, Any]:
    """Stack the crops of ``samples`` view-major and draw iBOT masks for the global crops.

    Args:
        samples: B dicts from ``MultiCropAugmentation``, or B ``(index, dict)`` pairs.
        grid: patch grid (h, w) of a global crop, e.g. (224 // 14, 224 // 14).
        mask_probability: fraction of the 2B global crops that get a block mask.
        mask_ratio: (min, max) fraction of patches masked in a masked crop, spread over the batch.
        rng: numpy generator for the masks; None seeds one from torch (see the module docstring).
        generator: block mask generator; default ``BlockMaskGenerator(grid)``.

    Returns the dict documented in the module docstring.
    """
    views, indices = _split_samples(samples)
    global_crops = _stack_view_major(views, "global")  # (2B, 3, G, G)
    local_crops = _stack_view_major(views, "local")  # (n_local * B, 3, L, L)
    _check_grid(global_crops, grid)
    rng = _torch_seeded_rng() if rng is None else rng
    batch = sample_batch_masks(
        len(global_crops), grid, mask_probability=mask_probability, ratio=mask_ratio,
        generator=generator, rng=rng,
    )
    masks = batch.masks  # (2B, N) bool
    mask_indices = masks.flatten().nonzero().flatten()  # (M,)
    per_image = 1.0 / masks.sum(-1).clamp(min=1).to(torch.float32)  # (2B,)
    masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]  # (M,)
    out: dict[str, Any] = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), mask_indices.numel(), dtype=torch.long),
        "upperbound": batch.upperbound,
    }
    if indices is not None:
        out["indices"] = indices
    return out
