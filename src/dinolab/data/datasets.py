"""Labelled image datasets for evaluation: ImageFolder folders or tars, list files, CIFAR-10.

- ``load_labeled``: an ImageFolder folder (``<class>/**/<image>``), a ``.tar``/``.tar.gz``/``.tgz`` of
  one (extracted once into the cache), or a ``.txt``/``.tsv`` list file of ``path label`` lines.
- ``load_cifar10``: the JPEG CIFAR-10 archives (``train.tar.gz``/``test.tar.gz``), decoded once into
  a uint8 ``.npy`` (N, 32, 32, 3) in the cache and memory-mapped afterwards.
- ``few_shot`` and ``stratified_split``: deterministic per-class subsets.

The cache is ``cache_dir``, else ``$DINOLAB_CACHE/datasets``, else ``~/.cache/dinolab/datasets``. Each
archive gets a folder keyed by its absolute path, size and mtime, so a changed archive is
re-read; the older folders of the same archive path are then deleted. Everything lands there
through a temp name + rename: an interrupted run never looks done. Before anything is written, the
member sizes in the tar headers are added up and checked against a cap: ``$DINOLAB_MAX_EXTRACT_BYTES``
when set, else 64 GiB lowered to 200 x the archive's size (but not below 1 GiB), since images barely
compress and more is an archive bomb.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from dinolab.data.images import IMAGE_EXTENSIONS
from dinolab.errors import DinolabError
from dinolab.io import atomic_write

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
EXTRACT_CAP_ENV = "DINOLAB_MAX_EXTRACT_BYTES"
DEFAULT_EXTRACT_CAP = 64 * 2**30  # bytes
MAX_EXTRACT_RATIO = 200  # extracted bytes per archive byte, unless $DINOLAB_MAX_EXTRACT_BYTES says otherwise
RATIO_FLOOR = 2**30  # the ratio never lowers the cap below this
MAX_CLASS_INDEX = 100_000  # integer list-file labels above this (and above 2 x the distinct labels) are refused
LIST_SUFFIXES = (".txt", ".tsv")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class LabeledImages:
    """Images with integer labels.

    Attributes:
        items: image paths, or one uint8 array (N, H, W, 3) of decoded images (see ``decoded``).
        labels: (N,) int64 class indices into ``classes``.
        classes: class names, index = label.
        ids: one id per image (relative path), used in outputs.
    """

    items: Sequence[str | os.PathLike] | np.ndarray
    labels: np.ndarray
    classes: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledImages:
        """The images at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        items = self.items[idx] if isinstance(self.items, np.ndarray) else [self.items[i] for i in idx]
        return LabeledImages(items, self.labels[idx], self.classes, [self.ids[i] for i in idx])


# ------------------------------------------------------------------------------------------ cache


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DINOLAB_CACHE", Path.home() / ".cache" / "dinolab")) / "datasets"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()[:12]


def _cache_entry(archive: Path, cache_dir: str | os.PathLike | None, kind: str) -> Path:
    """``<cache>/<archive name>-<kind>-<hash of absolute path>-<hash of size, mtime>``."""
    st = archive.stat()
    version = _digest(f"{st.st_size}\0{st.st_mtime_ns}")
    return _cache_root(cache_dir) / f"{archive.name}-{kind}-{_digest(str(archive.resolve()))}-{version}"


def _prune_older(entry: Path) -> None:
    """Delete the cache folders of earlier versions of ``entry``'s archive (same path and kind)."""
    stem = entry.name.rsplit("-", 1)[0]
    for old in entry.parent.glob(f"{glob.escape(stem)}-*"):
        if old != entry and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed %s (an earlier version of the same archive)", old)


def _extract_limit(archive: Path) -> tuple[int, str]:
    """The most bytes ``archive`` may extract to, and where that limit comes from (see the module doc)."""
    raw = os.environ.get(EXTRACT_CAP_ENV, "").strip()
    if raw:
        try:
            return int(float(raw)), f"${EXTRACT_CAP_ENV}"
        except (ValueError, OverflowError):
            raise DinolabError(f"${EXTRACT_CAP_ENV}={raw!r} is not a number of bytes") from None
    size = archive.stat().st_size
    limit = max(RATIO_FLOOR, MAX_EXTRACT_RATIO * size)
    if limit < DEFAULT_EXTRACT_CAP:
        return limit, (f"{MAX_EXTRACT_RATIO} x the archive's {size:,} bytes: images barely compress, this "
                       f"looks like an archive bomb; set ${EXTRACT_CAP_ENV} to allow it")
    return DEFAULT_EXTRACT_CAP, f"the default cap; set ${EXTRACT_CAP_ENV} to raise it"


def _check_extract_size(archive: Path, total: int, limit: tuple[int, str]) -> None:
    if total > limit[0]:
        raise DinolabError(f"{archive}: its members add up to {total:,} bytes or more, over the limit of "
                           f"{limit[0]:,} ({limit[1]}); refusing to extract it")


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


# ---------------------------------------------------------------------------------- ImageFolder


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_folder(root: Path) -> LabeledImages:
    """Classes = sorted non-hidden subfolders of ``root``; images found recursively in each."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DinolabError(f"{root} has no class subfolders: expected an ImageFolder layout <class>/<image>")
    ids: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(root / name):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(root)
            found += [(rel / f).as_posix() for f in files if _is_image(f)]
        if not found:
            raise DinolabError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        ids += sorted(found)
        labels += [label] * len(found)
    return LabeledImages([os.path.join(root, i) for i in ids], np.array(labels, np.int64), classes, ids)


def _dataset_root(folder: Path) -> Path:
    """``folder``, or its single top folder when that holds only subfolders (``train/<class>/...``)."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
        if inner and all(e.is_dir() for e in inner):
            return entries[0]
    return folder


# ------------------------------------------------------------------------------------------- tars


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name.replace("\\", "/"))
    if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in (p.parts or ("",))[0]:
        raise DinolabError(f"{archive}: refusing unsafe member {m.name!r} (absolute path or '..')")


def _safe_members(archive: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Regular files and folders with safe relative names; links and devices are skipped."""
    for m in tar:
        _check_member(archive, m)
        if m.isfile() or m.isdir():
            yield m
        else:
            logger.warning("%s: skipping %s (not a regular file)", archive, m.name)


def _extract_once(archive: Path, cache_dir: str | os.PathLike | None) -> Path:
    """The folder ``archive`` was extracted to, extracting it now if this is the first time."""
    dest = _cache_entry(archive, cache_dir, "files")
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        logger.info("extracting %s to %s (once)", archive, dest)
        with tarfile.open(archive) as tar:
            members = list(_safe_members(archive, tar))  # checks every name before writing anything
            _check_extract_size(archive, sum(m.size for m in members if m.isfile()), _extract_limit(archive))
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: also sanitises modes
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: use its copy
            if not dest.is_dir():
                raise
        _prune_older(dest)
    except tarfile.TarError as e:
        raise DinolabError(f"cannot read archive {archive}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------- list files


def _parse_line(list_file: Path, lineno: int, line: str) -> tuple[str, str]:
    parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise DinolabError(f"{list_file}:{lineno}: expected 'path label' (label an int or a class name), "
                           f"got {line!r}")
    return parts[0].strip(), parts[1].strip()


def _check_int_labels(list_file: Path, linenos: list[int], labels: list[int]) -> None:
    """Integer labels are class indices 0..N-1: refuse negative ones and ones far above the number of
    distinct labels (``MAX_CLASS_INDEX``), which would build a class list of that length."""
    bound = max(MAX_CLASS_INDEX, 2 * len(set(labels)))
    for lineno, label in zip(linenos, labels):
        if label < 0:
            raise DinolabError(f"{list_file}:{lineno}: negative label {label}")
        if label >= bound:
            raise DinolabError(f"{list_file}:{lineno}: label {label} is too large: integer labels are class "
                               f"indices and this file has {len(set(labels))} distinct labels (at most "
                               f"{bound - 1} allowed); renumber the classes 0..N-1 or use class names")


def _list_file(list_file: Path) -> LabeledImages:
    """Lines ``path<whitespace or tab>label``. If every label is an integer, they are the class
    indices (classes "0".."max"); otherwise labels are class names, classes sorted."""
    rows = []
    text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            rows.append((lineno, *_parse_line(list_file, lineno, line)))
    if not rows:
        raise DinolabError(f"list file {list_file} has no 'path label' lines (blank and # lines ignored)")
    names = [label for _, _, label in rows]
    if all(n.lstrip("+-").isdigit() for n in names):
        labels = [int(n) for n in names]
        _check_int_labels(list_file, [ln for ln, _, _ in rows], labels)
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[n] for n in names]
    ids = [path for _, path, _ in rows]
    items = [os.path.join(list_file.parent, p) for p in ids]
    return LabeledImages(items, np.array(labels, np.int64), classes, ids)


# ------------------------------------------------------------------------------------------ public


def load_labeled(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> LabeledImages:
    """A labelled dataset from an ImageFolder folder, a tar of one, or a list file.

    - folder: classes = sorted subfolder names, images found recursively inside each class folder
      (extensions ``IMAGE_EXTENSIONS``, any case; hidden files skipped); ids = ``class/.../file``.
    - ``.tar`` / ``.tar.gz`` / ``.tgz``: the same layout, possibly under one top folder; extracted once
      into the cache (members with absolute paths or ``..`` are refused, links skipped, the total size
      capped; older extractions of the same archive path are deleted).
    - ``.txt`` / ``.tsv``: ``path label`` per line (tab or whitespace; ``#`` comments and blank lines
      ignored; relative paths against the list file's folder); ids = paths as written.
    """
    path = Path(source)
    if path.is_dir():
        return _image_folder(path)
    if not path.exists():
        raise DinolabError(f"dataset {os.fspath(source)} does not exist")
    if _has_suffix(path, TAR_SUFFIXES):
        return _image_folder(_dataset_root(_extract_once(path, cache_dir)))
    if _has_suffix(path, LIST_SUFFIXES):
        return _list_file(path)
    raise DinolabError(f"{os.fspath(source)}: expected an ImageFolder folder, a {'/'.join(TAR_SUFFIXES)} "
                       f"archive of one, or a {'/'.join(LIST_SUFFIXES)} list file of 'path label' lines")


def find_shared_data(folder: str) -> tuple[Path | None, list[Path]]:
    """``../shared/data/<folder>``, looked for from the current folder, then from the repository of an
    editable install: (the first that exists, or None; every place looked in, for the error)."""
    candidates = [Path("..") / "shared" / "data" / folder]
    here = Path(__file__).resolve().parents
    if len(here) > 3:  # src/dinolab/data/datasets.py in an editable install: parents[3] = repo root
        candidates.append(here[3].parent / "shared" / "data" / folder)
    return next((c for c in candidates if c.is_dir()), None), candidates


def _cifar10_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    if "DINOLAB_CIFAR10" in os.environ:
        return Path(os.environ["DINOLAB_CIFAR10"])
    found, candidates = find_shared_data("cifar10")
    if found is not None:
        return found
    raise DinolabError(
        "CIFAR-10 not found: put train.tar.gz and test.tar.gz (ImageFolder JPEGs, <class>/NNNN.jpg) in a "
        "folder and set DINOLAB_CIFAR10=<folder> or pass root=; looked in "
        + ", ".join(str(c.resolve()) for c in candidates)
    )


def _decode_tar(archive: Path) -> tuple[np.ndarray, list[str]]:
    """All images of ``archive`` decoded to RGB, sorted by member path: ((N, H, W, 3) uint8, ids)."""
    decoded: dict[str, np.ndarray] = {}
    limit, total = _extract_limit(archive), 0
    try:
        with tarfile.open(archive) as tar:
            for m in _safe_members(archive, tar):
                total += m.size if m.isfile() else 0
                _check_extract_size(archive, total, limit)
                if m.isfile() and _is_image(PurePosixPath(m.name).name):
                    data = tar.extractfile(m).read()
                    with Image.open(io.BytesIO(data)) as img:
                        decoded[m.name] = np.asarray(img.convert("RGB"))
    except (tarfile.TarError, OSError) as e:
        raise DinolabError(f"cannot read {archive}: {e}") from e
    if not decoded:
        raise DinolabError(f"{archive} holds no images")
    names = sorted(decoded)
    shapes = {decoded[n].shape for n in names}
    if len(shapes) > 1:
        raise DinolabError(f"{archive}: images differ in size ({sorted(shapes)[:3]}...); cannot decode to one array")
    # strip one common top folder ("test/cat/0001.jpg" -> "cat/0001.jpg")
    tops = {n.split("/", 1)[0] for n in names}
    strip = len(tops) == 1 and all(n.count("/") >= 2 for n in names)
    ids = [n.split("/", 1)[1] if strip else n for n in names]
    return np.stack([decoded[n] for n in names]), ids


def _decoded_once(archive: Path, cache_dir: str | os.PathLike | None) -> tuple[np.ndarray, list[str]]:
    """(memory-mapped images, ids) of ``archive``, decoding it into the cache the first time."""
    entry = _cache_entry(archive, cache_dir, "decoded")
    npy, meta = entry / "images.npy", entry / "ids.json"
    if not npy.exists():  # images.npy is written last: its presence means the entry is complete
        logger.info("decoding %s into %s (once)", archive, npy)
        images, ids = _decode_tar(archive)
        entry.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, lambda f: f.write(json.dumps(ids).encode()))
        atomic_write(npy, lambda f: np.save(f, images))
        _prune_older(entry)
    return np.load(npy, mmap_mode="r"), json.loads(meta.read_text())


def load_cifar10(
    split: str, root: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
    decoded: bool = True,
) -> LabeledImages:
    """CIFAR-10 ``split`` ("train" 50,000 / "test" 10,000 images) from ``<root>/<split>.tar.gz``.

    ``root`` defaults to ``$DINOLAB_CIFAR10``, else ``../shared/data/cifar10`` (from the current folder
    or the repository). ``decoded=True``: all images are decoded once into a uint8 ``.npy``
    (N, 32, 32, 3) in the cache and ``items`` is that array, memory-mapped; ``decoded=False``: the
    archive is extracted once and ``items`` are JPEG paths. ids are ``class/NNNN.jpg``; classes in
    canonical CIFAR-10 order (``CIFAR10_CLASSES``, = sorted folder names).
    """
    if split not in ("train", "test"):
        raise DinolabError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    folder = _cifar10_root(root)
    archive = next((folder / f"{split}{s}" for s in (".tar.gz", ".tgz", ".tar") if (folder / f"{split}{s}").is_file()),
                   None)
    if archive is None:
        raise DinolabError(f"{folder} has no {split}.tar.gz: put the CIFAR-10 archives there or set DINOLAB_CIFAR10")
    if not decoded:
        ds = load_labeled(archive, cache_dir=cache_dir)
    else:
        images, ids = _decoded_once(archive, cache_dir)
        classes = sorted({i.split("/", 1)[0] for i in ids})
        index = {c: k for k, c in enumerate(classes)}
        labels = np.array([index[i.split("/", 1)[0]] for i in ids], np.int64)
        ds = LabeledImages(images, labels, classes, ids)
    if ds.classes != CIFAR10_CLASSES:
        raise DinolabError(f"{archive}: expected the CIFAR-10 classes {CIFAR10_CLASSES}, found {ds.classes}")
    return ds


def resolve_dataset(spec: str, **kw) -> LabeledImages:
    """``"cifar10:train"`` / ``"cifar10:test"`` -> ``load_cifar10``; anything else is a path for
    ``load_labeled``. Keyword arguments go to that function."""
    name, _, split = spec.partition(":")
    if name.lower() == "cifar10" and not Path(spec).exists():
        if not split:
            raise DinolabError("say which CIFAR-10 split: 'cifar10:train' or 'cifar10:test'")
        return load_cifar10(split, **kw)
    return load_labeled(spec, **kw)


# ----------------------------------------------------------------------------------------- subsets


def _by_class(ds: LabeledImages) -> list[np.ndarray]:
    return [np.flatnonzero(ds.labels == c) for c in range(len(ds.classes))]


def few_shot(ds: LabeledImages, n_per_class: int, seed: int = 0) -> LabeledImages:
    """``n_per_class`` images of every class, drawn at random (deterministic for a ``seed``), kept in
    dataset order. Raises ``DinolabError`` when a class has fewer images."""
    if n_per_class < 1:
        raise DinolabError(f"n_per_class must be >= 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    picked = []
    for c, idx in enumerate(_by_class(ds)):
        if len(idx) < n_per_class:
            raise DinolabError(f"class {ds.classes[c]!r} has {len(idx)} images, fewer than {n_per_class}")
        picked.append(rng.choice(idx, n_per_class, replace=False))
    return ds.subset(np.sort(np.concatenate(picked)))


def stratified_split(ds: LabeledImages, fraction: float, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """(rest, held_out): ``held_out`` takes ``round(fraction * n_c)`` random images of each class
    (half rounded up; deterministic for a ``seed``); both keep dataset order."""
    if not 0.0 < fraction < 1.0:
        raise DinolabError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = [rng.permutation(idx)[: int(np.floor(fraction * len(idx) + 0.5))] for idx in _by_class(ds)]
    mask = np.zeros(len(ds), bool)
    mask[np.concatenate(held)] = True
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))
