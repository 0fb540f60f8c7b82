"""RGB-depth datasets: file formats, masking of invalid pixels, bad inputs, named sets."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.data.depth import (
    DepthDataError,
    load_depth_folder,
    read_depth,
    resolve_depth_dataset,
    valid_depth_mask,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _rgb(path: Path, h: int = 6, w: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _png16(path: Path, mm: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mm.astype(np.uint16)).save(path)


def test_png_millimetres_to_metres(tmp_path):
    mm = np.array([[0, 1500], [65535, 250]], np.uint16)
    _png16(tmp_path / "d.png", mm)
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_allclose(read_depth(tmp_path / "d.png"), [[0, 1.5], [65.535, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png", png_scale=256), mm / 256, rtol=1e-6)


def test_npy_float16_metres_and_shapes(tmp_path):
    d = np.array([[0, 84.9], [np.nan, 3.25]], np.float16)
    np.save(tmp_path / "a.npy", d)
    np.save(tmp_path / "b.npy", d[None])
    for name in ("a.npy", "b.npy"):
        out = read_depth(tmp_path / name)
        assert out.dtype == np.float32 and out.shape == (2, 2)
        np.testing.assert_allclose(out[0], [0, 84.9], rtol=1e-3)
        assert np.isnan(out[1, 0])


@pytest.mark.parametrize("bad, match", [
    ("rgb.png", "16-bit"), ("grey8.png", "16-bit"), ("ints.npy", "dtype int"), ("cube.npy", "shape"),
    ("d.tiff", "unknown depth format"), ("broken.png", "cannot decode"),
])
def test_bad_depth_files_named(tmp_path, bad, match):
    p = tmp_path / bad
    if bad == "rgb.png":
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    elif bad == "grey8.png":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(p)
    elif bad == "ints.npy":
        np.save(p, np.zeros((4, 4), np.int32))
    elif bad == "cube.npy":
        np.save(p, np.zeros((2, 4, 4), np.float32))
    else:
        p.write_bytes(b"not an image")
    with pytest.raises(DepthDataError, match=match) as e:
        read_depth(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_valid_mask_rules():
    d = np.array([0.0, -1.0, np.inf, np.nan, 0.0005, 0.5, 10.0, 10.01], np.float32)
    np.testing.assert_array_equal(valid_depth_mask(d, 1e-3, 10.0),
                                  [False, False, False, False, False, True, True, False])


def _folder(root: Path, n: int = 3, h: int = 6, w: int = 8) -> None:
    for i in range(n):
        _rgb(root / "rgb" / f"{i:02d}.jpg", h, w)
        mm = np.full((h, w), 2000, np.uint16)
        mm[0, 0] = 0
        mm[0, 1] = 12000  # 12 m: above the default 10 m
        _png16(root / "depth" / f"{i:02d}.png", mm)


def test_folder_pairs_and_invalid_pixels_zeroed(tmp_path):
    _folder(tmp_path)
    ds = load_depth_folder(tmp_path)
    assert ds.ids == ["00", "01", "02"] and len(ds) == 3
    s = ds.load(1)
    assert s.image.size == (8, 6) and s.depth.shape == (6, 8)
    assert s.depth[0, 0] == 0 and s.depth[0, 1] == 0 and s.depth[1, 1] == pytest.approx(2.0)
    assert ds.with_range(max_depth=20.0).load(1).depth[0, 1] == pytest.approx(12.0)
    assert ds.subset([2]).ids == ["02"]


def test_missing_depth_and_bad_layout(tmp_path):
    _folder(tmp_path)
    _rgb(tmp_path / "rgb" / "99.jpg")
    with pytest.raises(DepthDataError, match="99.jpg"):
        load_depth_folder(tmp_path)
    with pytest.raises(DepthDataError, match="rgb/ .*depth/"):
        load_depth_folder(tmp_path / "rgb")


def test_size_mismatch_and_empty_depth_name_the_file(tmp_path):
    _folder(tmp_path, n=2)
    _png16(tmp_path / "depth" / "00.png", np.full((5, 8), 2000))
    _png16(tmp_path / "depth" / "01.png", np.zeros((6, 8)))
    ds = load_depth_folder(tmp_path)
    with pytest.raises(DepthDataError, match=r"00\.png.*8x5.*00\.jpg is 8x6"):
        ds.load(0)
    with pytest.raises(DepthDataError, match=r"01\.png: no valid depth"):
        ds.load(1)


def test_tar_of_folder_extracted_once(tmp_path):
    import tarfile

    _folder(tmp_path / "src" / "scene")
    archive = tmp_path / "scene.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "scene", arcname="scene")
    ds = resolve_depth_dataset(archive, cache_dir=tmp_path / "cache")
    assert len(ds) == 3 and ds.load(0).depth.shape == (6, 8)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_unknown_spec_and_bad_range(tmp_path):
    with pytest.raises(DepthDataError, match="named sets"):
        resolve_depth_dataset("nyu-full")
    _folder(tmp_path)
    with pytest.raises(DepthDataError, match="min_depth < max_depth"):
        resolve_depth_dataset(tmp_path, min_depth=5, max_depth=1)


needs_shared = pytest.mark.skipif(not (SHARED / "depth_samples_nyu_kitti").is_dir(), reason="shared data absent")


@needs_shared
def test_named_sets(tmp_path):
    nyu = resolve_depth_dataset("nyu-samples", root=SHARED, cache_dir=tmp_path)
    kitti = resolve_depth_dataset("kitti-samples", root=SHARED, cache_dir=tmp_path)
    val = resolve_depth_dataset("7scenes:val", root=SHARED, cache_dir=tmp_path)
    assert (len(nyu), nyu.max_depth, nyu.crop) == (3, 10.0, "eigen")
    assert (len(kitti), kitti.max_depth, kitti.crop) == (3, 80.0, "garg")
    assert (len(val), val.max_depth, val.crop) == (10, 10.0, None)
    s = nyu.load(0)
    assert s.image.size == (320, 240) and 0.5 < np.median(s.depth[s.depth > 0]) < 10  # metres, not mm
    k = kitti.load(0)
    assert k.image.size == (795, 240) and k.depth.max() <= 80.0  # > 80 m LiDAR returns masked
    raw = read_depth(kitti.depth[0])
    assert np.nanmax(raw) > 80.0 and (k.depth == 0).sum() > (raw == 0).sum()
    v = val.load(0).depth
    assert 0.7 < v[v > 0].min() and v.max() < 4.1  # README: 801-3975 mm
