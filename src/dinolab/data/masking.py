"""iBOT block masking: random rectangles of patches, and the per-batch masking scheme of DINOv2.

``BlockMaskGenerator`` follows the official ``MaskingGenerator`` (``dinov2/data/masking.py``), the
BEiT block-wise masking: rectangles are added one at a time until the mask holds the requested
number of patches. For each rectangle (at most 10 attempts):

1. budget = min(patches still missing, ``max_num_patches``);
2. target area ~ U(``min_num_patches``, budget); aspect ratio r ~ log-uniform(min_aspect, max_aspect);
3. h = round(sqrt(area * r)), w = round(sqrt(area / r)); the rectangle must be strictly smaller
   than the grid in both directions; its top-left corner is uniform over the valid positions;
4. it is painted if it adds between 1 and budget new patches (overlap with earlier rectangles is
   allowed and only the new patches count).

So the realised count is **never above the request** and usually equal to it: it falls short
only when 10 attempts in a row add nothing (typically 1-2 patches short, in ~5-8 % of the masks
of the default DINOv2 scheme). ``min_num_patches`` bounds the *drawn* area, not the result:
rounding the sides can give a smaller rectangle (area 4 with r = 0.5 gives 1 x 3), and when
fewer than ``min_num_patches`` patches are missing the area is drawn between the two, so the last
rectangle may be tiny (even 1 x 1). Masks are unions of axis-aligned rectangles.

``sample_batch_masks`` is the scheme of the official ``collate_data_and_cast``
(``dinov2/data/collate.py``): of ``n_images`` masks, ``int(n_images * mask_probability)`` get a
block mask and the rest are empty; the ratio range is split evenly (``linspace`` with
``n_masked + 1`` points) and masked image i requests ``int(N * U(r_i, r_{i+1}))`` patches; then
the list is shuffled. All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

MAX_ATTEMPTS = 10  # attempts per rectangle before the generator gives up (official value)

Rectangle = tuple[int, int, int, int]  # (top, left, height, width) in patches


class BlockMaskGenerator:
    """Block-wise (BEiT / iBOT) mask of a ``grid = (h, w)`` patch grid.

    Args:
        grid: patch grid (rows, cols), e.g. (16, 16) for 224 px and patch 14.
        max_num_patches: most patches one rectangle may add; default ``0.5 * h * w`` (as DINOv2's
            training script sets it).
        min_num_patches: lower bound of the drawn rectangle area (see the module docstring).
        min_aspect: smallest height / width ratio of a rectangle.
        max_aspect: largest ratio; default ``1 / min_aspect``.

    Example::

        gen = BlockMaskGenerator((16, 16))
        mask = gen(50, np.random.default_rng(0))  # (16, 16) bool, 50 True (rarely a few less)
    """

    def __init__(
        self,
        grid: tuple[int, int],
        *,
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = grid
        if height <= 0 or width <= 0:
            raise ValueError(f"grid must have positive sides, got {grid}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.grid = (int(height), int(width))
        self.num_patches = height * width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect)
        return (
            f"{type(self).__name__}(grid={self.grid}, max_num_patches={self.max_num_patches}, "
            f"min_num_patches={self.min_num_patches}, aspect=[{lo:.3f}, {hi:.3f}])"
        )

    def _draw_rectangle(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> Rectangle | None:
        """One attempt: a random rectangle adding 1..budget new patches to ``mask``, or None."""
        height, width = self.grid
        lo, hi = sorted((self.min_num_patches, budget))  # official: uniform(min, budget), either order
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*self.log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if not (h < height and w < width):
            return None
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        new = h * w - int(mask[top : top + h, left : left + w].sum())
        return (top, left, h, w) if 0 < new <= budget else None

    def sample_rectangles(
        self, num_masking_patches: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, list[Rectangle]]:
        """The (h, w) bool mask of about ``num_masking_patches`` patches and the rectangles painted
        into it, in order (each is (top, left, height, width))."""
        mask = np.zeros(self.grid, dtype=bool)
        rectangles: list[Rectangle] = []
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            rect = None
            for _ in range(MAX_ATTEMPTS):
                rect = self._draw_rectangle(mask, budget, rng)
                if rect is not None:
                    break
            if rect is None:  # 10 failed attempts: stop a little short of the request
                break
            top, left, h, w = rect
            count += h * w - int(mask[top : top + h, left : left + w].sum())
            mask[top : top + h, left : left + w] = True
            rectangles.append(rect)
        return mask, rectangles

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """(h, w) bool mask with at most (and usually exactly) ``num_masking_patches`` True."""
        return self.sample_rectangles(num_masking_patches, rng)[0]


class BatchMasks(NamedTuple):
    """Masks of one batch of images, shuffled (row i belongs to image i)."""

    masks: Tensor  # (n_images, h * w) bool
    ratio_bounds: Tensor  # (n_images, 2) float64: the [r_i, r_{i+1}] range drawn from; (0, 0) if unmasked
    upperbound: int  # sum over masked images of int(N * r_{i+1}): most masked patches the batch can have


def sample_batch_masks(
    n_images: int,
    grid: tuple[int, int],
    *,
    mask_probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
    generator: BlockMaskGenerator | None = None,
    rng: np.random.Generator,
) -> BatchMasks:
    """Block masks for ``n_images`` images as the official collate draws them (module docstring).

    ``generator`` defaults to ``BlockMaskGenerator(grid)``; its grid must equal ``grid``.
    """
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if len(ratio) != 2 or not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
        raise ValueError(f"ratio must be (min, max) with 0 <= min <= max <= 1, got {tuple(ratio)}")
    generator = BlockMaskGenerator(grid) if generator is None else generator
    if tuple(generator.grid) != tuple(grid):
        raise ValueError(f"generator grid {generator.grid} differs from grid {tuple(grid)}")
    n_patches = grid[0] * grid[1]
    n_masked = int(n_images * mask_probability)
    probs = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    bounds = np.zeros((n_images, 2), dtype=np.float64)
    upperbound = 0
    for i in range(n_masked):
        target = int(n_patches * rng.uniform(probs[i], probs[i + 1]))
        masks[i] = generator(target, rng).reshape(-1)
        bounds[i] = probs[i], probs[i + 1]
        upperbound += int(n_patches * probs[i + 1])
    order = rng.permutation(n_images)
    return BatchMasks(torch.from_numpy(masks[order]), torch.from_numpy(bounds[order]), upperbound)
