"""PCA part colouring: planted foreground/parts in synthetic features, and the end-to-end figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.models import create_model
from dinolab.viz.pca import SAMPLE_IMAGES, patch_pca, pca_figure, sample_images

D = 32


def _planted(h: int, w: int, gen: torch.Generator, centers: dict[str, torch.Tensor]):
    """(h, w, D) features: background everywhere, a central foreground box split into parts A (top
    half) and B (bottom half). Returns the features and the (h, w) part labels 0=bg, 1=A, 2=B."""
    labels = torch.zeros(h, w, dtype=torch.long)
    top, left = h // 4, w // 4
    mid = h // 2
    labels[top:mid, left : w - left] = 1
    labels[mid : h - top, left : w - left] = 2
    base = torch.stack([centers["bg"], centers["a"], centers["b"]])  # (3, D)
    x = base[labels] + 0.05 * torch.randn(h, w, D, generator=gen)
    return x, labels.numpy()


@pytest.fixture
def planted():
    gen = torch.Generator().manual_seed(0)
    fg = 3.0 * torch.randn(D, generator=gen)  # the foreground/background split dominates PC1
    centers = {
        "bg": torch.randn(D, generator=gen),
        "a": fg + torch.randn(D, generator=gen),
        "b": fg + torch.randn(D, generator=gen),
    }
    return [_planted(h, w, gen, centers) for h, w in [(12, 20), (16, 10)]]


@pytest.mark.parametrize("foreground", ["auto", "minority"])
def test_mask_recovers_planted_foreground(planted, foreground):
    result = patch_pca([x for x, _ in planted], foreground=foreground)
    for mask, (_, labels) in zip(result.masks, planted):
        assert mask.shape == labels.shape and mask.dtype == bool
        assert (mask == (labels > 0)).mean() > 0.95


def test_parts_get_matching_colours_across_images(planted):
    result = patch_pca([x for x, _ in planted])
    means = [{p: colors[labels == p].mean(0) for p in (1, 2)} for colors, (_, labels) in
             zip(result.colors, planted)]
    for part in (1, 2):  # the same part: the same colour in both images
        assert np.abs(means[0][part] - means[1][part]).max() < 0.1
    assert np.abs(means[0][1] - means[0][2]).max() > 0.5  # different parts: different colours
    for colors, (_, labels) in zip(result.colors, planted):  # background black
        assert np.all(colors[labels == 0] == 0)


def test_shapes_and_ranges_non_square():
    feats = [torch.randn(3, 7, D), torch.randn(5, 2, D)]
    result = patch_pca(feats, foreground="all")
    assert [c.shape for c in result.colors] == [(3, 7, 3), (5, 2, 3)]
    assert [m.shape for m in result.masks] == [(3, 7), (5, 2)]
    assert all(m.all() for m in result.masks)
    flat = np.concatenate([c.reshape(-1, 3) for c in result.colors])
    assert flat.dtype == np.float32 and flat.min() == 0.0 and flat.max() == 1.0
    assert np.allclose(flat.min(0), 0) and np.allclose(flat.max(0), 1)  # min-max per component


def test_threshold_tightens_mask_and_bad_args(planted):
    feats = [x for x, _ in planted]
    loose = sum(m.sum() for m in patch_pca(feats, threshold=-1.0).masks)
    tight = sum(m.sum() for m in patch_pca(feats, threshold=1.0).masks)
    assert tight < loose
    with pytest.raises(ValueError, match="foreground"):
        patch_pca(feats, foreground="sideways")
    with pytest.raises(ValueError, match="h, w, D"):
        patch_pca([torch.randn(10, D)])


def test_sample_images_offline():
    images = sample_images()
    assert [n for n, _ in images] == list(SAMPLE_IMAGES)
    for _, img in images:
        assert img.mode == "RGB" and min(img.size) >= 200
    with pytest.raises(ValueError, match="unknown sample"):
        sample_images(["lena"])


def test_pca_figure_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch14", depth=1, img_size=224)
    model.train()
    path_img = tmp_path / "in.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(path_img)
    images = [*sample_images(["chelsea", "motorcycle_left"]), path_img]
    out = pca_figure(model, images, tmp_path / "figs" / "pca.png", short_side=112)
    assert out == tmp_path / "figs" / "pca.png" and out.stat().st_size > 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > png.height > 0
    assert model.training  # the caller's mode is restored
    assert sorted(p.name for p in out.parent.iterdir()) == ["pca.png"]  # no temp file left


def test_auto_rule_handles_a_centred_majority_foreground():
    gen = torch.Generator().manual_seed(1)
    bg, fg = torch.randn(D, generator=gen), 3.0 * torch.randn(D, generator=gen)
    labels = torch.zeros(12, 12, dtype=torch.long)
    labels[1:11, 1:11] = 1  # 100 of 144 patches: the foreground is the majority, off the border
    x = torch.stack([bg, fg])[labels] + 0.05 * torch.randn(12, 12, D, generator=gen)
    assert (patch_pca([x]).masks[0] == labels.bool().numpy()).all()
    assert (patch_pca([x], foreground="minority").masks[0] == ~labels.bool().numpy()).all()


def test_pca_figure_title_names_the_model_and_each_image(tmp_path, monkeypatch):
    import dinolab.viz.pca as pca_mod

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4", img_size=32, depth=1)
    for name in ("cat one.png", "dog.jpg"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 36, 3), dtype=np.uint8)).save(tmp_path / name)
    figs = []
    monkeypatch.setattr(pca_mod, "atomic_save_figure", lambda fig, path: figs.append(fig))
    pca_figure(model, [tmp_path / "cat one.png", tmp_path / "dog.jpg"], tmp_path / "pca.png", short_side=16,
               model_name="my_vit_model")
    fig = figs[0]
    assert "my_vit_model" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert "cat one.png" in titles and "dog.jpg" in titles


def test_dense_transform_caps_the_long_side_of_a_strip(caplog):
    """A 1 x 5000 px image must not become 448 x 2,240,000 (MemoryError in pca / match)."""
    from dinolab.data.transforms import MAX_LONG_SIDE_FACTOR, make_dense_transform

    strip = Image.new("RGB", (5000, 1), (10, 20, 30))
    with caplog.at_level("INFO", logger="dinolab.data.transforms"):
        x = make_dense_transform(patch_size=14, short_side=448)(strip)
    assert x.shape[1:] == (14, MAX_LONG_SIDE_FACTOR * 448)  # one patch tall, long side capped at 896
    assert "capped" in caplog.text
    assert make_dense_transform(14, 448)(Image.new("RGB", (640, 480))).shape[1:] == (448, 602)  # no cap: 4:3
