"""Multi-crop collate: shapes, view-major order, and consistency of the iBOT mask tensors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.collate import collate_multicrop

G, L, GRID, N_LOCAL = 32, 16, (8, 8), 4
N = GRID[0] * GRID[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(b: int, n_local: int = N_LOCAL) -> dict[str, list[torch.Tensor]]:
    """Crops filled with a code: global view v of image b holds 10 * b + v, local view v 1000 + 10 * b + v."""
    return {
        "global": [torch.full((3, G, G), 10.0 * b + v) for v in range(2)],
        "local": [torch.full((3, L, L), 1000.0 + 10 * b + v) for v in range(n_local)],
    }


def _collate(samples, seed=0, **kwargs):
    return collate_multicrop(samples, grid=GRID, rng=np.random.default_rng(seed), **kwargs)


def test_shapes_and_keys():
    out = _collate([_sample(b) for b in range(3)])
    assert set(out) == {"global_crops", "local_crops", "masks", "mask_indices", "masks_weight",
                        "n_masked_patches", "upperbound"}
    assert out["global_crops"].shape == (6, 3, G, G)
    assert out["local_crops"].shape == (N_LOCAL * 3, 3, L, L)
    assert out["masks"].shape == (6, N) and out["masks"].dtype == torch.bool
    m = int(out["masks"].sum())
    assert out["mask_indices"].shape == (m,) and out["mask_indices"].dtype == torch.long
    assert out["masks_weight"].shape == (m,) and out["masks_weight"].dtype == torch.float32
    assert out["n_masked_patches"].tolist() == [m]
    assert isinstance(out["upperbound"], int) and out["upperbound"] >= m


def test_view_major_order():
    batch = 3
    out = _collate([_sample(b) for b in range(batch)])
    for v in range(2):
        for b in range(batch):
            assert out["global_crops"][v * batch + b, 0, 0, 0] == 10 * b + v
    for v in range(N_LOCAL):
        for b in range(batch):
            assert out["local_crops"][v * batch + b, 0, 0, 0] == 1000 + 10 * b + v


def test_half_the_global_crops_are_masked():
    for batch in (1, 3, 8):
        out = _collate([_sample(b) for b in range(batch)], seed=batch)
        assert int(out["masks"].any(1).sum()) == batch  # int(2B * 0.5)


def test_mask_indices_match_masks():
    out = _collate([_sample(b) for b in range(8)])
    flat = out["masks"].flatten()
    assert torch.equal(out["mask_indices"], flat.nonzero().flatten())
    assert flat[out["mask_indices"]].all() and out["mask_indices"].numel() == flat.sum()
    assert int(out["mask_indices"].max()) < 16 * N


def test_masks_weight_sums_to_one_per_masked_image():
    out = _collate([_sample(b) for b in range(8)])
    image = out["mask_indices"] // N  # which global crop each masked patch belongs to
    per_image = torch.zeros(16).index_add_(0, image, out["masks_weight"])
    masked = out["masks"].any(1)
    assert torch.allclose(per_image[masked], torch.ones(int(masked.sum())))
    assert torch.all(per_image[~masked] == 0)


def test_indices_from_pairs():
    out = _collate([(idx, _sample(b)) for b, idx in enumerate((5, 2, 9))])
    assert out["indices"].tolist() == [5, 2, 9] and out["indices"].dtype == torch.long
    assert out["global_crops"][1, 0, 0, 0] == 10  # order follows the samples


def test_deterministic_masks():
    samples = [_sample(b) for b in range(4)]
    assert torch.equal(_collate(samples, seed=3)["masks"], _collate(samples, seed=3)["masks"])
    torch.manual_seed(1)
    a = collate_multicrop(samples, grid=GRID)["masks"]  # rng=None: seeded from torch
    torch.manual_seed(1)
    assert torch.equal(a, collate_multicrop(samples, grid=GRID)["masks"])


def test_no_local_crops_and_no_masks():
    out = _collate([_sample(b, n_local=0) for b in range(2)], mask_probability=0.0)
    assert out["local_crops"].numel() == 0
    assert not out["masks"].any() and out["mask_indices"].numel() == 0 and out["upperbound"] == 0


def test_errors():
    with pytest.raises(ValueError, match="patch grid"):
        collate_multicrop([_sample(0)], grid=(5, 5), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty"):
        collate_multicrop([], grid=GRID)
    ragged = [_sample(0), _sample(1, n_local=2)]
    with pytest.raises(ValueError, match="local"):
        _collate(ragged)


class _TinyImages(Dataset):
    def __init__(self, transform: MultiCropAugmentation) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        return i, self.transform(Image.fromarray(pixels))


def test_with_augmentation_and_dataloader():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2, patch_size=4)
    loader = DataLoader(_TinyImages(aug), batch_size=4, collate_fn=functools.partial(collate_multicrop, grid=GRID))
    (batch,) = list(loader)
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["indices"].tolist() == [0, 1, 2, 3] and batch["masks"].shape == (8, N)
