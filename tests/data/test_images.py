"""Listing and decoding images: every odd file either decodes sensibly or is reported, never crashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinolab.data.images import (
    BadImageError,
    ImageListDataset,
    collate_skip_bad,
    list_images,
    list_images_with_ids,
    load_rgb,
    to_rgb,
)
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError


def _rgb(path, color=(10, 200, 30), size=(20, 16)):
    Image.new("RGB", size, color).save(path)
    return path


def _truncated_jpeg(path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------------------ listing


def test_folder_is_recursive_sorted_case_insensitive(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/z.JPG", "a.png", "b/c.webp", ".hidden/x.jpg", ".y.jpg"):
        _rgb(tmp_path / name) if not name.endswith("webp") else Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    paths, ids = list_images_with_ids(tmp_path)
    assert ids == ["a.png", "b/c.webp", "b/z.JPG"]
    assert paths == [str(tmp_path / i) for i in ids]
    assert list_images(str(tmp_path)) == paths


def test_list_file_resolves_relative_paths_and_skips_comments(tmp_path):
    (tmp_path / "imgs").mkdir()
    _rgb(tmp_path / "imgs" / "a.jpg")
    absolute = _rgb(tmp_path / "abs.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my images\n\nimgs/a.jpg\n  {absolute}  \n")
    paths, ids = list_images_with_ids(lst)
    assert ids == ["imgs/a.jpg", str(absolute)]
    assert paths == [str(tmp_path / "imgs/a.jpg"), str(absolute)]


def test_list_of_paths_is_kept_as_given(tmp_path):
    given = [tmp_path / "x.jpg", "y/z.png"]
    assert list_images(given) == [str(tmp_path / "x.jpg"), "y/z.png"]
    single = _rgb(tmp_path / "one.jpg")
    assert list_images(single) == [str(single)]


@pytest.mark.parametrize(
    "kind", ["empty_dir", "only_text", "missing", "empty_list_file", "empty_list", "other"]
)
def test_nothing_to_list_is_a_clear_error(tmp_path, kind):
    source = {
        "empty_dir": tmp_path,
        "only_text": tmp_path,
        "missing": tmp_path / "nope",
        "empty_list_file": tmp_path / "l.txt",
        "empty_list": [],
        "other": tmp_path / "data.csv",
    }[kind]
    if kind == "only_text":
        (tmp_path / "notes.txt").write_text("x")
    if kind == "empty_list_file":
        source.write_text("# nothing\n\n")
    if kind == "other":
        source.write_text("a,b")
    with pytest.raises(DinolabError) as e:
        list_images(source)
    if kind in ("empty_dir", "only_text"):
        assert str(tmp_path) in str(e.value) and "no images found" in str(e.value)


# ----------------------------------------------------------------------------------- decoding


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "l.png")
    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 250, 20, 5] + [0] * 762)
    pal.save(tmp_path / "p.gif")
    Image.new("CMYK", (5, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("1", (5, 4), 1).save(tmp_path / "bw.bmp")
    for name, expected in [("l.png", (77,) * 3), ("p.gif", (250, 20, 5)), ("bw.bmp", (255,) * 3)]:
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == expected
    assert all(abs(c - 255) <= 2 for c in load_rgb(tmp_path / "cmyk.jpg").getpixel((0, 0)))


def test_alpha_is_composited_onto_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[:, :3] = (200, 0, 0, 255)  # left: opaque red; right: transparent black
    a[:, 3:] = (0, 0, 0, 0)
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(a[..., [0, 3]], "LA").save(tmp_path / "la.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 0, 0)
    assert img.getpixel((5, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "la.png").getpixel((5, 0)) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    img = load_rgb(tmp_path / "g16.png")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    mode_i = Image.fromarray(a.astype(np.int32), mode="I")
    assert to_rgb(mode_i).getpixel((1, 0)) == (128, 128, 128)
    mode_f = Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F")
    assert to_rgb(mode_f).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (10, 20)


@pytest.mark.parametrize("kind", ["random_bytes", "truncated_jpeg", "text_as_png", "missing", "bomb"])
def test_bad_files_raise_bad_image_error(tmp_path, kind, monkeypatch):
    path = tmp_path / "x.png"
    if kind == "random_bytes":
        path = tmp_path / "x.jpg"
        path.write_bytes(np.random.default_rng(1).integers(0, 255, 2000, dtype=np.uint8).tobytes())
    elif kind == "truncated_jpeg":
        path = _truncated_jpeg(tmp_path / "x.jpg")
        Image.open(path)  # the header alone is fine: only a full decode finds the truncation
    elif kind == "text_as_png":
        path.write_text("hello, I am not a picture")
    elif kind == "bomb":
        _rgb(path, size=(100, 100))
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 10_000 px > 2x the limit -> error
    with pytest.raises(BadImageError) as e:
        load_rgb(path)
    assert e.value.path == str(path) and e.value.reason and "\n" not in e.value.reason
    if kind == "truncated_jpeg":
        assert "truncated" in e.value.reason


# -------------------------------------------------------------------------- dataset and collate


def test_dataloader_with_workers_skips_and_reports_bad_files(tmp_path):
    good = [_rgb(tmp_path / f"{i}.jpg", (i * 40, 0, 0)) for i in range(3)]
    corrupt = tmp_path / "c.jpg"
    corrupt.write_bytes(b"\xff\xd8garbage")
    items = [good[0], corrupt, good[1], _truncated_jpeg(tmp_path / "t.jpg"), good[2], tmp_path / "gone.png"]
    ds = ImageListDataset(items, make_classification_transform(resize=16, crop=16))
    assert ds[1].image is None and ds[1].error and ds[0].error is None
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert [i for b in batches for i in b.indices] == [0, 2, 4]
    assert [i for b in batches for i, _ in b.skipped] == [1, 3, 5]
    assert batches[0].images.shape == (2, 3, 16, 16) and batches[1].images.shape == (1, 3, 16, 16)


def test_collate_all_bad_and_mixed_sizes():
    pil = [Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))]
    ds = ImageListDataset(pil, lambda im: torch.zeros(3, *im.size))
    assert collate_skip_bad([ds[0]]).images.shape == (1, 3, 8, 8)
    batch = collate_skip_bad([ds[0]._replace(image=None, error="boom")])
    assert batch.images is None and batch.skipped == [(0, "boom")]
    with pytest.raises(DinolabError, match="different sizes"):
        collate_skip_bad([ds[0], ds[1]])
