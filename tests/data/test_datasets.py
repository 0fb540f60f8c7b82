"""Labelled datasets: ImageFolder folders and tars, list files, subsets, and the shared CIFAR-10."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinolab.data.datasets as datasets_mod
from dinolab.data.datasets import (
    CIFAR10_CLASSES,
    LabeledImages,
    few_shot,
    load_cifar10,
    load_labeled,
    resolve_dataset,
    stratified_split,
)
from dinolab.data.images import ImageListDataset
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError

SHARED_CIFAR = Path("/work/shared/data/cifar10")


def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tree(root: Path, spec: dict[str, int]) -> Path:
    """ImageFolder tree: ``spec`` = {class: number of images}; odd images go in a nested folder."""
    for c, n in spec.items():
        for i in range(n):
            p = root / c / ("deep" if i % 2 else "") / f"{i:03d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_jpeg_bytes(i))
    return root


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    root = _tree(tmp_path / "ds", {"dog": 3, "cat": 2})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.jpg").write_bytes(_jpeg_bytes(0))
    (root / "stray.jpg").write_bytes(_jpeg_bytes(0))  # outside any class folder: ignored
    ds = load_labeled(root)
    assert ds.classes == ["cat", "dog"]
    assert ds.ids == ["cat/000.jpg", "cat/deep/001.jpg", "dog/000.jpg", "dog/002.jpg", "dog/deep/001.jpg"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.labels.dtype == np.int64
    assert all(os.path.isfile(p) for p in ds.items)
    assert len(ds) == 5


def test_image_folder_errors(tmp_path):
    with pytest.raises(DinolabError, match="does not exist"):
        load_labeled(tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DinolabError, match="holds no images"):
        load_labeled(tmp_path / "empty")
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(DinolabError, match="expected an ImageFolder"):
        load_labeled(tmp_path / "x.zip")


# ------------------------------------------------------------------------------------------- tars


def test_tar_extracted_once_into_cache(tmp_path, monkeypatch):
    members = {f"top/{c}/{i}.jpg": _jpeg_bytes(i) for c in ("b", "a") for i in range(3)}
    archive = _tar(tmp_path / "ds.tar.gz", members)
    cache = tmp_path / "cache"
    ds = load_labeled(archive, cache_dir=cache)
    assert ds.classes == ["a", "b"] and ds.ids[:2] == ["a/0.jpg", "a/1.jpg"] and len(ds) == 6
    assert all(str(p).startswith(str(cache)) and os.path.isfile(p) for p in ds.items)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    calls, extractall = [], tarfile.TarFile.extractall
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: calls.append(1) or extractall(*a, **k))
    again = load_labeled(archive, cache_dir=cache)
    assert calls == [] and again.ids == ds.ids and again.items == ds.items

    os.utime(archive, ns=(1, 1))  # a changed archive (new mtime) is extracted afresh
    load_labeled(archive, cache_dir=cache)
    assert calls == [1]


def test_tar_default_cache_under_dinolab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path / "dc"))
    archive = _tar(tmp_path / "ds.tar", {"cat/0.jpg": _jpeg_bytes(0), "dog/0.jpg": _jpeg_bytes(1)})
    ds = load_labeled(archive)
    assert Path(ds.items[0]).is_relative_to(tmp_path / "dc" / "datasets")


@pytest.mark.parametrize("bad", ["../evil.jpg", "cat/../../evil.jpg", "/tmp/evil.jpg"])
def test_tar_unsafe_member_refused(tmp_path, bad):
    archive = _tar(tmp_path / "bad.tgz", {"cat/0.jpg": _jpeg_bytes(0), bad: _jpeg_bytes(1)})
    with pytest.raises(DinolabError, match="unsafe member"):
        load_labeled(archive, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.jpg").exists()
    assert not list((tmp_path / "cache").glob("bad.tgz-files-*"))  # nothing looks extracted


def _link_tar(path: Path, kind: bytes, linkname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {"cat/0.jpg": _jpeg_bytes(0), "dog/0.jpg": _jpeg_bytes(1)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dog/1.jpg")
        link.type, link.linkname = kind, linkname
        tar.addfile(link)
    return path


@pytest.mark.parametrize("kind, target", [(tarfile.SYMTYPE, "../../outside.jpg"), (tarfile.SYMTYPE, "/etc/passwd"),
                                          (tarfile.LNKTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "cat/0.jpg")])
def test_tar_link_members_are_never_extracted(tmp_path, kind, target):
    archive = _link_tar(tmp_path / "links.tgz", kind, target)
    ds = load_labeled(archive, cache_dir=tmp_path / "cache")
    assert ds.ids == ["cat/0.jpg", "dog/0.jpg"]  # the regular files only
    extracted = list((tmp_path / "cache").rglob("*"))
    assert not any(p.is_symlink() for p in extracted) and not any(p.name == "1.jpg" for p in extracted)
    assert all(p.is_relative_to(tmp_path / "cache") for p in extracted)


def test_tar_extraction_is_capped_before_anything_is_written(tmp_path, monkeypatch):
    archive = _tar(tmp_path / "big.tar.gz", {"cat/0.jpg": b"\0" * 3000, "dog/0.jpg": b"\0" * 3000})
    calls, extractall = [], tarfile.TarFile.extractall
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: calls.append(1) or extractall(*a, **k))
    monkeypatch.setenv("DINOLAB_MAX_EXTRACT_BYTES", "5000")
    with pytest.raises(DinolabError, match=r"big.tar.gz: its members add up to 6,000 bytes.*5,000 \("
                       r"\$DINOLAB_MAX_EXTRACT_BYTES\)"):
        load_labeled(archive, cache_dir=tmp_path / "cache")
    assert calls == [] and not list((tmp_path / "cache").iterdir())  # refused from the headers
    monkeypatch.setenv("DINOLAB_MAX_EXTRACT_BYTES", "6000")
    assert len(load_labeled(archive, cache_dir=tmp_path / "cache")) == 2
    monkeypatch.setenv("DINOLAB_MAX_EXTRACT_BYTES", "lots")
    with pytest.raises(DinolabError, match="not a number of bytes"):
        load_labeled(_tar(tmp_path / "other.tar", {"a/0.jpg": b"x"}), cache_dir=tmp_path / "cache")


def test_tar_bomb_refused_by_the_ratio_to_the_archive_size(tmp_path, monkeypatch):
    monkeypatch.delenv("DINOLAB_MAX_EXTRACT_BYTES", raising=False)
    monkeypatch.setattr(datasets_mod, "RATIO_FLOOR", 2**20)  # instead of 1 GiB, to keep the test small
    archive = _tar(tmp_path / "bomb.tar.gz", {"cat/0.jpg": b"\0" * 2**22})  # 4 MiB of zeros in a few KB
    assert archive.stat().st_size * 200 < 2**22
    with pytest.raises(DinolabError, match=r"200 x the archive's .* archive bomb"):
        load_labeled(archive, cache_dir=tmp_path / "cache")
    with pytest.raises(DinolabError, match="archive bomb"):  # the in-memory decode of CIFAR-style archives too
        datasets_mod._decode_tar(archive)


def test_a_changed_archive_replaces_its_older_extraction(tmp_path):
    cache = tmp_path / "cache"
    archive = _tar(tmp_path / "ds.tar.gz", {"cat/0.jpg": _jpeg_bytes(0), "dog/0.jpg": _jpeg_bytes(1)})
    (tmp_path / "sub").mkdir()
    other = _tar(tmp_path / "sub" / "ds.tar.gz", {"cat/0.jpg": _jpeg_bytes(2), "dog/0.jpg": _jpeg_bytes(3)})
    # ^ the same name at another path: another archive, its extraction is kept
    load_labeled(other, cache_dir=cache)
    first = Path(load_labeled(archive, cache_dir=cache).items[0])
    for i in range(3):  # the archive changes: each new extraction replaces the previous one
        _tar(archive, {"cat/0.jpg": _jpeg_bytes(10 + i), "dog/0.jpg": _jpeg_bytes(1)})
        os.utime(archive, ns=(10**9 * (i + 2), 10**9 * (i + 2)))
        now = Path(load_labeled(archive, cache_dir=cache).items[0])
        assert now.read_bytes() == _jpeg_bytes(10 + i)
    assert not first.exists() and len(list(cache.iterdir())) == 2  # this archive's newest + the other one's


# ------------------------------------------------------------------------------------- list files


def test_list_file_int_labels(tmp_path):
    lst = tmp_path / "sub" / "list.txt"
    lst.parent.mkdir()
    lst.write_text("# header\n\na.jpg 2\n  /abs/b.jpg\t0\ndir with space/c.jpg\t1\n")
    ds = load_labeled(lst)
    assert ds.ids == ["a.jpg", "/abs/b.jpg", "dir with space/c.jpg"]
    assert ds.items == [str(tmp_path / "sub" / "a.jpg"), "/abs/b.jpg", str(tmp_path / "sub" / "dir with space/c.jpg")]
    assert ds.labels.tolist() == [2, 0, 1] and ds.classes == ["0", "1", "2"]


def test_list_file_name_labels(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("x.jpg dog\ny.jpg cat\nz.jpg dog\n")
    ds = load_labeled(lst)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [1, 0, 1]


def test_list_file_bad_line(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("x.jpg 0\n# ok\nnolabel.jpg\n")
    with pytest.raises(DinolabError, match=r"list.txt:3: expected 'path label'"):
        load_labeled(lst)
    lst.write_text("x.jpg 0\ny.jpg -1\n")
    with pytest.raises(DinolabError, match=r"list.txt:2: negative label"):
        load_labeled(lst)
    lst.write_text("x.jpg 0\ny.jpg 99999999999\n")
    with pytest.raises(DinolabError, match=r"list.txt:2: label 99999999999 is too large.*2 distinct labels"):
        load_labeled(lst)
    lst.write_text("x.jpg 0\ny.jpg 99999\n")  # gaps in the class indices stay allowed (a subset's labels)
    assert len(load_labeled(lst).classes) == 100_000
    lst.write_text("# only comments\n\n")
    with pytest.raises(DinolabError, match="no 'path label' lines"):
        load_labeled(lst)


# ----------------------------------------------------------------------------------------- subsets


def _synthetic(counts: list[int]) -> LabeledImages:
    labels = np.repeat(np.arange(len(counts)), counts)
    ids = [f"{i}.jpg" for i in range(len(labels))]
    return LabeledImages(ids, labels, [f"c{c}" for c in range(len(counts))], ids)


def test_few_shot():
    ds = _synthetic([10, 7, 12])
    a, b = few_shot(ds, 5, seed=1), few_shot(ds, 5, seed=1)
    assert a.ids == b.ids and np.bincount(a.labels).tolist() == [5, 5, 5]
    assert a.ids == sorted(a.ids, key=lambda s: int(s[:-4]))  # dataset order
    assert few_shot(ds, 5, seed=2).ids != a.ids
    with pytest.raises(DinolabError, match="'c1' has 7 images, fewer than 8"):
        few_shot(ds, 8)


def test_stratified_split():
    ds = _synthetic([10, 20, 5])
    rest, held = stratified_split(ds, 0.2, seed=0)
    assert np.bincount(held.labels).tolist() == [2, 4, 1]
    assert np.bincount(rest.labels).tolist() == [8, 16, 4]
    assert not set(rest.ids) & set(held.ids) and len(rest) + len(held) == len(ds)
    assert stratified_split(ds, 0.2, seed=0)[1].ids == held.ids
    with pytest.raises(DinolabError, match="fraction"):
        stratified_split(ds, 1.0)


def test_subset_of_array_items():
    ds = LabeledImages(np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3), np.array([0, 1, 0, 1]),
                       ["a", "b"], ["0", "1", "2", "3"])
    sub = ds.subset([3, 1])
    assert sub.items.shape == (2, 2, 2, 3) and sub.ids == ["3", "1"] and (sub.items[0] == ds.items[3]).all()


# ------------------------------------------------------------------------------------------ CIFAR-10


def test_cifar10_missing_root_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_CIFAR10", str(tmp_path))
    with pytest.raises(DinolabError, match="test.tar.gz"):
        load_cifar10("test")
    with pytest.raises(DinolabError, match="'train' or 'test'"):
        load_cifar10("val")


def test_cifar10_small_fake_archive(tmp_path, monkeypatch):
    """A 2-per-class archive in the shared layout: decoded once, then memory-mapped."""
    members = {f"{c}/{i:04d}.jpg": _jpeg_bytes(i) for c in CIFAR10_CLASSES for i in range(2)}
    _tar(tmp_path / "test.tar.gz", members)
    ds = load_cifar10("test", tmp_path, cache_dir=tmp_path / "cache")
    assert ds.items.shape == (20, 8, 8, 3) and ds.items.dtype == np.uint8
    assert isinstance(ds.items, np.memmap) and ds.ids[:3] == ["airplane/0000.jpg", "airplane/0001.jpg",
                                                                  "automobile/0000.jpg"]
    assert np.bincount(ds.labels).tolist() == [2] * 10 and ds.classes == CIFAR10_CLASSES
    expected = np.asarray(Image.open(io.BytesIO(members["cat/0001.jpg"])).convert("RGB"))
    assert (ds.items[ds.ids.index("cat/0001.jpg")] == expected).all()

    monkeypatch.setattr(datasets_mod, "_decode_tar", lambda *_: pytest.fail("decoded twice"))
    monkeypatch.setenv("DINOLAB_CIFAR10", str(tmp_path))
    again = resolve_dataset("cifar10:test", cache_dir=tmp_path / "cache")
    assert again.ids == ds.ids and (np.asarray(again.items) == np.asarray(ds.items)).all()

    paths = load_cifar10("test", tmp_path, cache_dir=tmp_path / "cache", decoded=False)
    assert paths.ids == ds.ids and os.path.isfile(paths.items[0])


def test_image_array_dataset():
    arr = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    dset = ImageListDataset(arr, make_classification_transform(resize=32, crop=32))
    s = dset[2]
    assert len(dset) == 3 and s.error is None and s.image.shape == (3, 32, 32)
    ref = make_classification_transform(resize=32, crop=32)(Image.fromarray(arr[2]))
    assert torch.equal(s.image, ref)
    with pytest.raises(DinolabError, match="uint8 of shape"):
        ImageListDataset(arr.astype(np.float32), make_classification_transform())


@pytest.mark.skipif(not (SHARED_CIFAR / "test.tar.gz").exists(), reason="shared CIFAR-10 not present")
def test_cifar10_real_test_split(tmp_path):
    ds = load_cifar10("test", SHARED_CIFAR, cache_dir=tmp_path)
    assert len(ds) == 10_000 and ds.items.shape == (10_000, 32, 32, 3) and ds.items.dtype == np.uint8
    assert ds.classes == CIFAR10_CLASSES and np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.ids[0] == "airplane/0000.jpg" and ds.ids[-1] == "truck/0999.jpg"
    assert ds.items[0].shape == (32, 32, 3) and ds.items.std() > 10  # real pictures, not zeros
    with tarfile.open(SHARED_CIFAR / "test.tar.gz") as tar:  # spot-check one image against the archive
        data = tar.extractfile("cat/0042.jpg").read()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (ds.items[ds.ids.index("cat/0042.jpg")] == expected).all()


def test_extract_features_on_decoded_array_and_labeled_images():
    from dinolab.eval.features import extract_features
    from dinolab.models import create_model

    arr = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    ds = LabeledImages(arr, np.array([0, 1, 0, 1, 0]), ["a", "b"], [f"x/{i}.jpg" for i in range(5)])
    model = create_model("vit_tiny_patch4", depth=1)
    kw = {"transform": make_classification_transform(resize=32, crop=32), "device": "cpu", "progress": False}
    f_arr = extract_features(model, ds.items, batch_size=2, **kw)
    f_ds = extract_features(model, ds, batch_size=2, **kw)
    assert f_arr.ids == ["0", "1", "2", "3", "4"] and f_ds.ids == ds.ids
    assert f_arr.cls.shape == (5, model.embed_dim) and torch.equal(f_arr.cls, f_ds.cls)
