"""iBOT block masks: counts, rectangles, determinism, and the per-batch ratio scheme of DINOv2."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from dinolab.data.masking import BlockMaskGenerator, sample_batch_masks

# A mask never exceeds its request and stops short only after 10 failed attempts in a row; over
# these tests the shortfall stays below SHORTFALL patches (observed max: 2 on 3000 draws).
SHORTFALL = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2-D bool mask."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, size = deque([start]), 0
        while queue:
            i, j = queue.popleft()
            size += 1
            for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                    seen[n] = True
                    queue.append(n)
        sizes.append(size)
    return sizes


# ------------------------------------------------------------------------------- one mask


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (6, 10)])
def test_count_is_the_request_or_slightly_less(grid):
    gen, rng = BlockMaskGenerator(grid), np.random.default_rng(0)
    n = grid[0] * grid[1]
    exact = 0
    for _ in range(300):
        request = int(n * rng.uniform(0.1, 0.5))
        mask = gen(request, rng)
        assert mask.shape == grid and mask.dtype == bool
        assert request - SHORTFALL < mask.sum() <= request
        exact += mask.sum() == request
    assert exact >= 0.85 * 300


def test_zero_request_is_empty():
    assert not BlockMaskGenerator((16, 16))(0, np.random.default_rng(0)).any()


def test_same_seed_same_mask():
    gen = BlockMaskGenerator((16, 16))
    a = [gen(60, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(*a)
    assert not np.array_equal(a[0], gen(60, np.random.default_rng(8)))


def test_masks_are_unions_of_rectangles():
    gen, rng = BlockMaskGenerator((14, 14)), np.random.default_rng(1)
    for request in (10, 40, 90):
        for _ in range(50):
            mask, rects = gen.sample_rectangles(request, rng)
            painted = np.zeros_like(mask)
            for top, left, h, w in rects:
                assert 1 <= h < 14 and 1 <= w < 14 and top + h <= 14 and left + w <= 14
                before = painted.sum()
                painted[top : top + h, left : left + w] = True
                assert 0 < painted.sum() - before <= request - before  # adds something, never too much
            assert np.array_equal(painted, mask)
            assert len(_components(mask)) <= len(rects)  # blocks, not scattered patches


def test_blocks_are_compact():
    # 100 of 256 patches in a handful of blocks: far fewer components than a random scatter would give
    gen, rng = BlockMaskGenerator((16, 16)), np.random.default_rng(2)
    counts = [len(_components(gen(100, rng))) for _ in range(100)]
    assert np.mean(counts) < 8


@pytest.mark.parametrize("min_patches", [4, 16])
def test_min_num_patches_bounds_the_drawn_area(min_patches):
    # The drawn area is >= min_num_patches while the budget allows it; rounding both sides to
    # integers can lose up to about half a row and half a column (e.g. area 4 -> 1 x 3).
    gen = BlockMaskGenerator((16, 16), min_num_patches=min_patches, max_num_patches=64)
    r = 0.3  # the most elongated aspect loses the most
    slack = 0.5 * math.sqrt(min_patches) * (math.sqrt(r) + 1 / math.sqrt(r)) - 0.25
    rng, areas = np.random.default_rng(3), []
    for _ in range(200):
        _, rects = gen.sample_rectangles(int(rng.integers(min_patches, 120)), rng)
        areas.append(rects[0][2] * rects[0][3])  # the first rectangle always has budget >= min
    assert min(areas) >= min_patches - slack
    assert np.mean(areas) > min_patches
    if min_patches == 16:  # a larger minimum really gives larger blocks
        small = BlockMaskGenerator((16, 16), min_num_patches=1, max_num_patches=64)
        small_areas = [small.sample_rectangles(60, rng)[1][0] for _ in range(200)]
        assert np.mean([h * w for _, _, h, w in small_areas]) < np.mean(areas)


def test_requests_below_min_num_patches_still_work():
    gen, rng = BlockMaskGenerator((16, 16)), np.random.default_rng(4)
    sums = [gen(2, rng).sum() for _ in range(100)]
    assert max(sums) <= 2 and np.mean(sums) > 1.8


def test_invalid_generator_arguments():
    with pytest.raises(ValueError):
        BlockMaskGenerator((0, 16))
    with pytest.raises(ValueError):
        BlockMaskGenerator((16, 16), min_aspect=2.0, max_aspect=1.0)


# ---------------------------------------------------------------------------- batch scheme


def test_half_the_images_are_masked():
    for n_images in (2, 7, 64):
        batch = sample_batch_masks(n_images, (16, 16), rng=np.random.default_rng(n_images))
        assert batch.masks.shape == (n_images, 256) and batch.masks.dtype == torch.bool
        assert int(batch.masks.any(1).sum()) == int(n_images * 0.5)
    assert not sample_batch_masks(8, (16, 16), mask_probability=0.0, rng=np.random.default_rng(0)).masks.any()
    assert sample_batch_masks(8, (16, 16), mask_probability=1.0, rng=np.random.default_rng(0)).masks.any(1).all()


def test_realised_fraction_lies_in_the_assigned_range():
    # target = int(N * U(r_i, r_{i+1})): at most r_{i+1}; at least r_i less one patch (int) and the
    # generator's shortfall. Tolerance below r_i: SHORTFALL / N; none above r_{i+1}.
    n_patches, rng = 256, np.random.default_rng(5)
    for _ in range(10):
        batch = sample_batch_masks(64, (16, 16), ratio=(0.1, 0.5), rng=rng)
        fraction = batch.masks.sum(1).double() / n_patches
        masked = batch.masks.any(1)
        lo, hi = batch.ratio_bounds[masked].T
        assert torch.all(fraction[masked] <= hi + 1e-9)
        assert torch.all(fraction[masked] >= lo - SHORTFALL / n_patches)
        assert torch.all(batch.ratio_bounds[~masked] == 0)
        # the masked images' ranges tile [0.1, 0.5] evenly
        edges = torch.sort(lo).values
        assert torch.allclose(edges, torch.linspace(0.1, 0.5, 33, dtype=torch.float64)[:-1])
        assert batch.upperbound == sum(int(n_patches * h) for h in hi.tolist()) >= batch.masks.sum()


def test_shuffle_is_deterministic_with_a_seeded_rng():
    a = sample_batch_masks(16, (16, 16), rng=np.random.default_rng(11))
    b = sample_batch_masks(16, (16, 16), rng=np.random.default_rng(11))
    assert torch.equal(a.masks, b.masks) and torch.equal(a.ratio_bounds, b.ratio_bounds)
    # shuffled: the masked images are not always the first half
    patterns = {tuple(sample_batch_masks(16, (16, 16), rng=np.random.default_rng(s)).masks.any(1).tolist())
                for s in range(5)}
    assert len(patterns) > 1 and tuple([True] * 8 + [False] * 8) not in patterns


def test_batch_argument_checks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_batch_masks(4, (16, 16), mask_probability=1.5, rng=rng)
    with pytest.raises(ValueError):
        sample_batch_masks(4, (16, 16), ratio=(0.5, 0.1), rng=rng)
    with pytest.raises(ValueError, match="grid"):
        sample_batch_masks(4, (16, 16), generator=BlockMaskGenerator((8, 8)), rng=rng)
