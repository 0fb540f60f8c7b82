"""Segmentation datasets: folder pairing, index / palette / RGB masks, ADE20K label reduction,
named specs, and every bad input rejected with a message naming the file."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.data.segmentation import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    SegmentationError,
    load_camvid,
    load_segmentation_folder,
    parse_classes,
    read_mask,
    resolve_segmentation_dataset,
    voc_palette,
)

SHARED_CAMVID = Path("/work/shared/data/camvid")


def _pair(root, id_, mask, size=None, mode=None):
    h, w = size or mask.shape[:2]
    (root / "images" / id_).parent.mkdir(parents=True, exist_ok=True)
    (root / "masks" / id_).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(root / "images" / f"{id_}.jpg")
    img = Image.fromarray(mask)
    (img.convert(mode) if mode else img).save(root / "masks" / f"{id_}.png")


def test_folder_pairs_images_and_masks(tmp_path):
    m = np.array([[0, 1, 2], [255, 1, 0]], np.uint8)
    _pair(tmp_path, "b", m)
    _pair(tmp_path, "sub/a", m[::-1].copy())
    ds = load_segmentation_folder(tmp_path, classes=["x", "y", "z"])
    assert ds.ids == ["b", "sub/a"] and len(ds) == 2 and ds.num_classes == 3
    img, mask = ds.load(0)
    assert mask.dtype == np.int64 and mask.tolist() == m.tolist() and img.size == (3, 2)
    assert ds.load_mask(1).tolist() == m[::-1].tolist()
    assert ds.subset([1]).ids == ["sub/a"] and ds.fingerprint() != ds.subset([1]).fingerprint()
    assert (0, 0, 0) not in ds.palette  # default colours skip black, the ignore colour of overlays


def test_classes_inferred_from_masks(tmp_path):
    _pair(tmp_path, "a", np.array([[0, 3], [255, 1]], np.uint8))
    ds = load_segmentation_folder(tmp_path)
    assert ds.classes == ["0", "1", "2", "3"]


def test_palette_mode_masks_are_class_indices(tmp_path):
    m = np.array([[0, 15], [20, 255]], np.uint8)
    img = Image.fromarray(m, mode="P")
    img.putpalette([v for c in voc_palette(256) for v in c])
    img.save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", num_classes=21).tolist() == m.tolist()


def test_voc_palette_known_colours():
    pal = voc_palette(21)
    assert pal[0] == (0, 0, 0) and pal[1] == (128, 0, 0) and pal[15] == (192, 128, 128) and pal[20] == (0, 64, 128)


def test_reduce_zero_label_ade20k_style(tmp_path):
    Image.fromarray(np.array([[0, 1, 150], [255, 2, 0]], np.uint8)).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.png", num_classes=150, reduce_zero_label=True)
    assert got.tolist() == [[255, 0, 149], [255, 1, 255]]
    with pytest.raises(SegmentationError, match="reduce_zero_label"):  # 150 is not a class without the reduction
        read_mask(tmp_path / "m.png", num_classes=150)


def test_rgb_masks_through_a_palette_with_ignore_colour(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (128, 64, 128)  # road
    rgb[0, 1] = (128, 128, 128)  # sky
    rgb[1] = (0, 0, 0)  # void
    _pair(tmp_path, "a", rgb)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "classes": ["sky", "road"], "palette": [[128, 128, 128], [128, 64, 128]], "mask_format": "rgb",
        "ignore_colors": [[0, 0, 0]]}))
    ds = load_segmentation_folder(tmp_path)
    assert ds.classes == ["sky", "road"] and ds.palette == [(128, 128, 128), (128, 64, 128)]
    assert ds.load_mask(0).tolist() == [[1, 0, 255], [255, 255, 255]]
    rgb[0, 2] = (1, 2, 3)
    _pair(tmp_path, "a", rgb)
    with pytest.raises(SegmentationError, match=r"a\.png.*\(1, 2, 3\)"):
        ds.load_mask(0)


def test_rgb_mask_without_palette_is_refused_unless_grey(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(SegmentationError, match="colour.png.*palette"):
        read_mask(tmp_path / "colour.png", num_classes=5)
    Image.fromarray(np.stack([np.array([[1, 2], [3, 255]], np.uint8)] * 3, -1)).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png", num_classes=5).tolist() == [[1, 2], [3, 255]]


def test_bad_inputs_name_the_file(tmp_path):
    m = np.zeros((4, 6), np.uint8)
    _pair(tmp_path, "ok", m)
    _pair(tmp_path, "small", m, size=(5, 6))  # image 6x5, mask 6x4
    ds = load_segmentation_folder(tmp_path, classes=["a", "b"])
    with pytest.raises(SegmentationError, match=r"small\.png.*6x4.*6x5"):
        ds.load(ds.ids.index("small"))
    _pair(tmp_path, "bad", np.full((4, 6), 7, np.uint8))
    ds = load_segmentation_folder(tmp_path, classes=["a", "b"])
    with pytest.raises(SegmentationError, match=r"bad\.png.*\[7\].*ignore index 255"):
        ds.load_mask(ds.ids.index("bad"))
    (tmp_path / "images" / "orphan.jpg").write_bytes((tmp_path / "images" / "ok.jpg").read_bytes())
    with pytest.raises(SegmentationError, match=r"orphan\.jpg has no mask.*orphan\.png"):
        load_segmentation_folder(tmp_path, classes=["a", "b"])
    (tmp_path / "images" / "orphan.jpg").unlink()
    with pytest.raises(ValueError, match="ignore_index 1 is a class index"):  # SegmentationError is a ValueError
        load_segmentation_folder(tmp_path, classes=["a", "b"], ignore_index=1)


def test_empty_and_missing_datasets(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(SegmentationError, match="empty"):
        load_segmentation_folder(tmp_path)
    with pytest.raises(SegmentationError, match="missing folder annotations"):
        load_segmentation_folder(tmp_path, masks_dir="annotations")
    with pytest.raises(SegmentationError, match="does not exist"):
        resolve_segmentation_dataset(str(tmp_path / "nope"))
    with pytest.raises(SegmentationError, match="camvid:train"):
        resolve_segmentation_dataset("camvid")


def test_voc_layout_via_split_file(tmp_path):
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    for i in ("2007_01", "2007_02", "2007_03"):
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(np.array([[0, 15, 255]] * 3, np.uint8)).save(tmp_path / "SegmentationClass" / f"{i}.png")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_03\n2007_01\n")
    ds = resolve_segmentation_dataset("voc2012:val", root=tmp_path)
    assert ds.ids == ["2007_03", "2007_01"] and ds.num_classes == 21 and ds.classes[15] == "person"
    assert ds.load_mask(0)[0].tolist() == [0, 15, 255]
    with pytest.raises(SegmentationError, match="fixed options"):
        resolve_segmentation_dataset("voc2012:val", root=tmp_path, classes=["a"])


def test_archive_is_extracted_once(tmp_path):
    src = tmp_path / "src"
    _pair(src, "a", np.array([[0, 1]], np.uint8))
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tar:
        tar.add(src / "images", "images")
        tar.add(src / "masks", "masks")
    ds = load_segmentation_folder(tmp_path / "d.tar.gz", classes=["a", "b"], cache_dir=tmp_path / "cache")
    assert ds.ids == ["a"] and str(tmp_path / "cache") in ds.images[0]


def test_parse_classes(tmp_path):
    assert parse_classes("sky, road,car") == {"classes": ["sky", "road", "car"]}
    (tmp_path / "c.txt").write_text("sky\n\nroad\n")
    assert parse_classes(tmp_path / "c.txt") == {"classes": ["sky", "road"]}
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["a"], "palette": [[1, 2, 3]]}))
    assert parse_classes(str(tmp_path / "c.json"))["palette"] == [[1, 2, 3]]
    with pytest.raises(SegmentationError, match="does not exist"):
        parse_classes(tmp_path / "missing.json")


@pytest.mark.skipif(not (SHARED_CAMVID / "val.tar.gz").exists(), reason="shared CamVid not present")
def test_camvid_spec(monkeypatch):
    monkeypatch.setenv("DINOLAB_CAMVID", str(SHARED_CAMVID))
    ds = resolve_segmentation_dataset("camvid:val")
    assert len(ds) == 233 and ds.classes == CAMVID_CLASSES and ds.palette == CAMVID_PALETTE
    img, mask = ds.load(0)
    assert img.size == (320, 240) and set(np.unique(mask).tolist()) <= set(range(11)) | {255}
    assert len(load_camvid("train")) == 367
