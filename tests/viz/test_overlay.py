"""Class colours for labels without a palette: distinct hues, not the VOC bit pattern's near-twins."""

from __future__ import annotations

import numpy as np
import pytest

from dinolab.viz.overlay import distinct_palette


def _min_delta_e(colours) -> float:
    """Smallest CIELAB distance (Delta E 1976) between two colours of the list; ~2.3 is barely visible."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(colours, dtype=float)[None] / 255.0)[0]
    d = np.sqrt(((lab[:, None] - lab[None]) ** 2).sum(-1))
    d[np.eye(len(lab), dtype=bool)] = np.inf
    return float(d.min())


@pytest.mark.parametrize("n", [2, 11, 20, 40])
def test_palette_colours_are_pairwise_distinct(n):
    pal = distinct_palette(n)
    assert len(pal) == n and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in pal)
    assert _min_delta_e(pal) > 15  # the VOC palette used before: 12.2 at 11 classes, 8.8 at 20, 6.1 at 40


def test_palette_stays_apart_beyond_40_and_is_deterministic():
    assert _min_delta_e(distinct_palette(60)) > 8
    assert distinct_palette(30) == distinct_palette(30) and distinct_palette(30)[:20] == distinct_palette(20)


def test_folder_dataset_and_head_without_palette_use_it(tmp_path):
    import torch
    from PIL import Image

    from dinolab.data.segmentation import load_segmentation_folder
    from dinolab.eval.segmentation import LinearSegHead, read_seg_head

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / "a.png")
    names = [f"c{i}" for i in range(12)]
    ds = load_segmentation_folder(tmp_path, classes=names)
    assert ds.palette == distinct_palette(12)
    head = LinearSegHead(8, 12)
    torch.save({"state_dict": {f"decode_head.{k}": v for k, v in head.state_dict().items()},
                "meta": {"CLASSES": names}}, tmp_path / "head.pth")  # a head file with names, no palette
    assert read_seg_head(tmp_path / "head.pth").palette == distinct_palette(12)
