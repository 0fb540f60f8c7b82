"""Near-duplicate detection on real photos with real edits (resize, crop, JPEG, colour shift).

Feature: ``pixel_features`` (8 x 8 area-resized pixels, each channel standardised per image, L2-normalised),
a deterministic descriptor — a random backbone says nothing about copies. It is invariant to
brightness / contrast / colour casts and barely moved by rescaling and JPEG; crops move it most
(a 10% crop shifts the 8 x 8 grid by most of a cell), so the planted copies use crops that keep
95-99% of each side (the benchmark measures stronger crops with a trained backbone).
Images: the 38 textured quadrants (64 x 64) of 12 scikit-image sample photos.
"""

import numpy as np
import pytest
from PIL import Image

from dinolab.curate.copies import (
    OPS,
    augment_copy,
    pair_precision_recall,
    pixel_features,
    precision_recall_sweep,
)
from dinolab.curate.dedup import find_duplicates
from dinolab.errors import DinolabError

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel", "retina", "camera",
          "moon", "coins", "horse", "clock"]
MILD_CROP = (0.95, 0.99)


@pytest.fixture(scope="module")
def tiles() -> list[Image.Image]:
    from skimage import data

    out = []
    for name in PHOTOS:
        a = getattr(data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        h, w = a.shape[:2]
        for i in range(2):
            for j in range(2):
                tile = np.ascontiguousarray(a[i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2])
                if tile.std() >= 20:  # skip flat quadrants (e.g. plain background)
                    out.append(Image.fromarray(tile).resize((64, 64), Image.Resampling.BICUBIC))
    assert len(out) == 38
    return out


def test_augment_copy_is_seeded_and_keeps_size(tiles):
    a = augment_copy(tiles[0], np.random.default_rng(5))
    b = augment_copy(tiles[0], np.random.default_rng(5))
    assert a.size == tiles[0].size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    for op in OPS:  # every edit really changes the pixels
        c = augment_copy(tiles[0], np.random.default_rng(0), ops=(op,))
        assert np.abs(np.asarray(c, np.int16) - np.asarray(tiles[0], np.int16)).mean() > 1.0, op
    with pytest.raises(DinolabError, match="unknown copy edits"):
        augment_copy(tiles[0], np.random.default_rng(0), ops=("rotate",))


def test_pixel_features_invariances(tiles):
    f0 = pixel_features(tiles, 8)
    assert f0.shape == (38, 192) and np.allclose(np.linalg.norm(f0, axis=1), 1, atol=1e-5)
    rng = np.random.default_rng(1)
    for op, floor in (("resize", 0.99), ("jpeg", 0.98), ("colour", 0.95), ("crop", 0.8)):
        copies = [augment_copy(t, rng, ops=(op,), crop_keep=MILD_CROP) for t in tiles]
        sims = np.sum(pixel_features(copies, 8) * f0, axis=1)
        assert sims.min() > floor, (op, sims.min())
    # the distinct tiles are far apart: at most 0.81 (camera vs retina quadrants)
    s = f0 @ f0.T
    np.fill_diagonal(s, -1)
    assert s.max() < 0.82


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dedup_finds_planted_copies_and_keeps_distinct(tiles, seed):
    rng = np.random.default_rng(seed)
    src = rng.choice(len(tiles), 16, replace=False)
    copies = [augment_copy(tiles[s], rng, crop_keep=MILD_CROP) for s in src]  # all four edits each
    images = tiles + copies
    perm = rng.permutation(len(images))  # copies are not simply at the end
    inv = np.argsort(perm)
    feats = pixel_features([images[i] for i in perm], 8)
    planted = {tuple(sorted((int(inv[s]), int(inv[38 + j])))) for j, s in enumerate(src)}
    res = find_duplicates(feats, threshold=0.85, k=4)
    assert {tuple(c.tolist()) for c in res.components} == planted
    assert res.keep.sum() == 38  # one of each pair kept, every distinct tile kept
    assert pair_precision_recall(res.pairs, planted) == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                         "found": 16, "true": 16, "correct": 16}


def test_pair_precision_recall_by_hand():
    true = [(0, 1), (2, 3), (4, 5)]
    r = pair_precision_recall([(1, 0), (2, 3), (6, 7), (2, 3)], true)  # order and repeats do not matter
    assert (r["precision"], r["recall"]) == (2 / 3, 2 / 3) and r["f1"] == pytest.approx(2 / 3)
    assert pair_precision_recall([], true)["precision"] == 1.0
    pairs = np.array([[0, 1], [2, 3], [6, 7], [4, 5]])
    sims = np.array([0.99, 0.9, 0.95, 0.8])
    sweep = precision_recall_sweep(pairs, sims, true, [0.8, 0.92, 1.0])
    assert [(s["precision"], s["recall"]) for s in sweep] == [(3 / 4, 1.0), (1 / 2, 1 / 3), (1.0, 0.0)]
