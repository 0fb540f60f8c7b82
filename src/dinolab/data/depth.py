"""RGB + metric depth datasets: plain folders, tars of them, 7-Scenes and the NYU/KITTI samples.

Layout of a folder (or of a ``.tar``/``.tar.gz`` of one, extracted once into the dataset cache)::

    <root>/rgb/<stem>.jpg|png|...      the image
    <root>/depth/<stem>.png            16-bit greyscale PNG, millimetres (value / ``png_scale`` = metres)
    <root>/depth/<stem>.npy            or float16/32/64 metres

Every image needs a depth map of the same size. A depth pixel is *valid* when it is finite, > 0
and inside ``[min_depth, max_depth]``; :meth:`DepthDataset.load` returns invalid pixels as 0, so
``gt > 0`` is the valid mask downstream (losses, metrics). A file that cannot be used — an 8-bit or
RGB depth PNG, an integer ``.npy``, an image/depth size mismatch, a depth map with no valid pixel —
raises :class:`DepthDataError` (a ``ValueError``) naming the file.

Named datasets (``resolve_depth_dataset``), read from ``$DINOLAB_DEPTH_DATA`` or ``../shared/data``:

- ``7scenes:train`` / ``7scenes:val``: Microsoft 7-Scenes RedKitchen, 40 / 10 frames, 320x240, depth
  in mm. **Depth is not registered to RGB** (offsets up to ~20 px): a training smoke test, not a
  benchmark. Max depth 10 m, no crop.
- ``nyu-samples``: 3 NYU Depth V2 frames, aligned mm PNGs; max depth 10 m, Eigen crop.
- ``kitti-samples``: 3 KITTI frames, semi-dense float16 metres ``.npy``; max depth 80 m, Garg crop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.datasets import TAR_SUFFIXES, _dataset_root, _extract_once, _has_suffix, find_shared_data
from dinolab.data.images import IMAGE_EXTENSIONS, load_rgb
from dinolab.errors import DinolabError

log = logging.getLogger(__name__)

DEPTH_EXTENSIONS = (".png", ".npy")
CROPS = ("eigen", "garg")
_PNG16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DepthDataError(DinolabError, ValueError):
    """An RGB-depth file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class DepthSample:
    """One loaded pair: ``image`` (RGB) and ``depth`` (H, W) float32 metres, 0 where invalid."""

    id: str
    image: Image.Image
    depth: np.ndarray


@dataclass
class DepthDataset:
    """Paired RGB and depth files plus how to read and score them.

    Attributes:
        rgb, depth: one path each per sample, same order.
        ids: one id per sample (the file stem).
        name: where it came from (spec or folder), for logs and results.
        min_depth, max_depth: the valid range in metres (outside -> invalid).
        crop: evaluation crop, ``"eigen"`` (NYU), ``"garg"`` (KITTI) or None.
        png_scale: depth PNG value per metre (1000: millimetres).
    """

    rgb: list[Path] = field(repr=False)
    depth: list[Path] = field(repr=False)
    ids: list[str] = field(repr=False)
    name: str = "depth"
    min_depth: float = 1e-3
    max_depth: float = 10.0
    crop: str | None = None
    png_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_depth < self.max_depth:
            raise DepthDataError(f"{self.name}: need 0 <= min_depth < max_depth, got {self.min_depth}, "
                                 f"{self.max_depth}")
        if self.crop not in (None, *CROPS):
            raise DepthDataError(f"crop must be one of {CROPS} or None, got {self.crop!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> DepthDataset:
        """The samples at ``indices``, in that order (same settings)."""
        idx = list(indices)
        return replace(self, rgb=[self.rgb[i] for i in idx], depth=[self.depth[i] for i in idx],
                       ids=[self.ids[i] for i in idx])

    def with_range(self, min_depth: float | None = None, max_depth: float | None = None,
                   crop: str | None | bool = False) -> DepthDataset:
        """A copy with another valid range and/or crop (``crop=False`` keeps the current one)."""
        return replace(self, min_depth=self.min_depth if min_depth is None else min_depth,
                       max_depth=self.max_depth if max_depth is None else max_depth,
                       crop=self.crop if crop is False else crop)

    def load(self, i: int) -> DepthSample:
        """Decode sample ``i``: the RGB image and its depth in metres with invalid pixels set to 0."""
        image = load_rgb(self.rgb[i])
        depth = read_depth(self.depth[i], png_scale=self.png_scale)
        if depth.shape != (image.height, image.width):
            raise DepthDataError(f"{self.depth[i]}: depth is {depth.shape[1]}x{depth.shape[0]} (WxH) but "
                                 f"{self.rgb[i]} is {image.width}x{image.height}; resize the depth map "
                                 "(nearest neighbour) to the image size")
        valid = valid_depth_mask(depth, self.min_depth, self.max_depth)
        if not valid.any():
            raise DepthDataError(f"{self.depth[i]}: no valid depth pixel (finite, > 0, in "
                                 f"[{self.min_depth:g}, {self.max_depth:g}] m); check the units "
                                 "(PNG: millimetres, .npy: metres) or the --min-depth/--max-depth range")
        return DepthSample(self.ids[i], image, np.where(valid, depth, 0.0).astype(np.float32))


def valid_depth_mask(depth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """Bool mask of usable depth values: finite, > 0 and within ``[min_depth, max_depth]``."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(depth) & (depth > 0) & (depth >= min_depth) & (depth <= max_depth)


def read_depth(path: str | os.PathLike, *, png_scale: float = 1000.0) -> np.ndarray:
    """A depth file as (H, W) float32 metres; non-finite values are kept (they count as invalid).

    ``.png`` must be 16-bit greyscale (value / ``png_scale`` metres; millimetres by default);
    ``.npy`` must hold floats in metres, shaped (H, W), (1, H, W) or (H, W, 1).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        try:
            with Image.open(path) as img:
                img.load()
                mode, array = img.mode, np.asarray(img)
        except Exception as e:  # Pillow raises many types
            raise DepthDataError(f"{path}: cannot decode the depth PNG ({type(e).__name__}: {e})") from e
        if mode not in _PNG16_MODES or array.ndim != 2:
            raise DepthDataError(f"{path}: depth PNG has mode {mode} ({array.dtype}); expected a 16-bit "
                                 "greyscale PNG in millimetres (uint16), or a float .npy in metres")
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise DepthDataError(f"{path}: depth PNG values outside the uint16 range; save as uint16 millimetres")
        return (array.astype(np.float32) / np.float32(png_scale)).astype(np.float32)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DepthDataError(f"{path}: cannot read the .npy depth map ({e})") from e
        if not np.issubdtype(array.dtype, np.floating):
            raise DepthDataError(f"{path}: depth .npy has dtype {array.dtype}; expected float16/32/64 metres "
                                 "(integer millimetres belong in a 16-bit PNG)")
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.ndim != 2:
            raise DepthDataError(f"{path}: depth .npy has shape {array.shape}; expected (H, W)")
        return array.astype(np.float32)
    raise DepthDataError(f"{path}: unknown depth format {suffix!r}; use a 16-bit .png (mm) or a float .npy (m)")


# ------------------------------------------------------------------------------------- folders


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions:
            if f.stem in found:
                raise DepthDataError(f"{folder}: two files share the stem {f.stem!r} "
                                     f"({found[f.stem].name}, {f.name})")
            found[f.stem] = f
    return found


def load_depth_folder(root: str | os.PathLike, *, name: str | None = None, **settings) -> DepthDataset:
    """Pairs ``<root>/rgb/<stem>.<image>`` with ``<root>/depth/<stem>.png|.npy`` (sorted by stem).

    Every image must have a depth map (else :class:`DepthDataError` naming the first ones missing);
    depth maps without an image are ignored with a warning. ``settings`` go to :class:`DepthDataset`.
    """
    root = Path(root)
    rgb_dir, depth_dir = root / "rgb", root / "depth"
    if not rgb_dir.is_dir() or not depth_dir.is_dir():
        raise DepthDataError(f"{root}: expected subfolders rgb/ (images) and depth/ (16-bit mm .png or "
                             "float metre .npy, same file stems)")
    images = _files_by_stem(rgb_dir, IMAGE_EXTENSIONS)
    depths = _files_by_stem(depth_dir, DEPTH_EXTENSIONS)
    if not images:
        raise DepthDataError(f"{rgb_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    missing = [s for s in images if s not in depths]
    if missing:
        raise DepthDataError(f"{root}: {len(missing)} images have no depth map in depth/ (e.g. "
                             f"{', '.join(images[s].name for s in missing[:3])})")
    orphans = sorted(set(depths) - set(images))
    if orphans:
        log.warning("%s: %d depth maps without an image are ignored (e.g. %s)", root, len(orphans), orphans[0])
    stems = sorted(images)
    return DepthDataset([images[s] for s in stems], [depths[s] for s in stems], stems,
                        name=name or str(root), **settings)


# ------------------------------------------------------------------------------- named datasets

# spec -> (shared-data folder, archive, sub-folder inside it, settings)
NAMED: dict[str, tuple[str, str, str, dict]] = {
    "7scenes:train": ("sevenscenes_redkitchen", "train.tar.gz", "", {"max_depth": 10.0}),
    "7scenes:val": ("sevenscenes_redkitchen", "val.tar.gz", "", {"max_depth": 10.0}),
    "nyu-samples": ("depth_samples_nyu_kitti", "samples.tar.gz", "nyu", {"max_depth": 10.0, "crop": "eigen"}),
    "kitti-samples": ("depth_samples_nyu_kitti", "samples.tar.gz", "kitti", {"max_depth": 80.0, "crop": "garg"}),
}


def _shared_data_dir(folder: str, root: str | os.PathLike | None) -> Path:
    """``<root>/<folder>``; root defaults to ``$DINOLAB_DEPTH_DATA``, else ``../shared/data`` (from
    the current folder or from the repository of an editable install)."""
    if root is not None or "DINOLAB_DEPTH_DATA" in os.environ:
        return Path(root if root is not None else os.environ["DINOLAB_DEPTH_DATA"]) / folder
    found, candidates = find_shared_data(folder)
    if found is not None:
        return found
    raise DepthDataError(f"{folder} not found: set DINOLAB_DEPTH_DATA to the folder holding {folder}/ "
                         f"(looked in {', '.join(str(c.resolve()) for c in candidates)})")


def resolve_depth_dataset(spec: str | os.PathLike, *, root: str | os.PathLike | None = None,
                          cache_dir: str | os.PathLike | None = None, min_depth: float | None = None,
                          max_depth: float | None = None, crop: str | None | bool = False,
                          png_scale: float = 1000.0) -> DepthDataset:
    """A depth dataset from a spec: ``7scenes:train``, ``7scenes:val``, ``nyu-samples``,
    ``kitti-samples``, an ``rgb/`` + ``depth/`` folder, or a tar of one.

    Archives are extracted once into the dataset cache (``cache_dir``, else
    ``$DINOLAB_CACHE/datasets``). Named sets bring their max depth and crop; ``min_depth``,
    ``max_depth`` and ``crop`` (``None`` = no crop; ``False`` = keep the default) override them.
    """
    key = str(spec).lower()
    if key in NAMED and not Path(spec).exists():
        folder, archive, sub, settings = NAMED[key]
        data = _shared_data_dir(folder, root)
        if not (data / archive).is_file():
            raise DepthDataError(f"{data / archive} not found: the {key} archive belongs there")
        extracted = _extract_once(data / archive, cache_dir)
        ds = load_depth_folder(extracted / sub if sub else _dataset_root(extracted), name=key,
                               png_scale=png_scale, **settings)
    elif key.startswith(("7scenes", "nyu", "kitti")) and not Path(spec).exists():
        raise DepthDataError(f"unknown depth dataset {spec!r}; named sets: {', '.join(NAMED)} (or pass a folder "
                             "with rgb/ and depth/)")
    else:
        path = Path(spec)
        if not path.exists():
            raise DepthDataError(f"depth dataset {path} does not exist (named sets: {', '.join(NAMED)})")
        if path.is_file() and _has_suffix(path, TAR_SUFFIXES):
            path = _depth_root(_extract_once(path, cache_dir))
        ds = load_depth_folder(path, png_scale=png_scale)
    return ds.with_range(min_depth, max_depth, crop)


def _depth_root(folder: Path) -> Path:
    """``folder``, or its single top folder when the archive wrapped ``rgb/`` + ``depth/`` in one."""
    if (folder / "rgb").is_dir():
        return folder
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    return entries[0] if len(entries) == 1 and (entries[0] / "rgb").is_dir() else folder
