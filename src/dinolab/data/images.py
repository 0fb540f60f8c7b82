"""Finding and decoding images robustly.

``list_images`` turns a folder, a ``.txt`` list file or a list of paths into image paths;
``load_rgb`` decodes one file into an 8-bit RGB ``PIL.Image`` or raises ``BadImageError`` with the
reason. ``ImageListDataset`` + ``collate_skip_bad`` let a ``DataLoader`` (with workers) skip bad
files and report them instead of crashing.

Decoding choices:

- transparency (RGBA, LA, palette with a transparent colour) is composited onto **white**, so fully
  transparent pixels never show whatever colour happens to be stored under them;
- 16-bit greyscale (modes ``I;16*`` and ``I``) is scaled by 255/65535, not clipped at 255;
  float images (``F``) in [0, 1] are scaled by 255, other float ranges are min-max scaled;
- the EXIF orientation is applied (a broken EXIF block is ignored, not a reason to skip);
- truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False);
- Pillow's decompression-bomb limit applies: an image over 2 x ``Image.MAX_IMAGE_PIXELS`` (179 M px by
  default) is refused from its header, before anything is decoded; a bomb is a bad image;
- only regular files are opened (a named pipe with an image name would block the reader).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from dinolab.errors import DinolabError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_FILE_EXTENSIONS = (".txt",)

ImageSource = str | os.PathLike | Sequence[str | os.PathLike]


class BadImageError(DinolabError):
    """A file that cannot be decoded as an image (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


# ---------------------------------------------------------------------------------------- listing


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Image files under ``folder``, recursive, hidden files and folders skipped, sorted by
    relative path. Symlinked files are listed; symlinked folders are not entered (no loops)."""
    rel: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(root).relative_to(folder)
        rel += [(base / f).as_posix() for f in files if not f.startswith(".") and _is_image_name(f)]
    rel.sort()
    if not rel:
        raise DinolabError(
            f"no images found in folder {folder} (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case; hidden files skipped)"
        )
    return [os.path.join(folder, r) for r in rel], rel


def _read_list_file(list_file: Path) -> tuple[list[str], list[str]]:
    """Paths from a list file: one per line, blank lines and ``#`` lines ignored, relative paths
    resolved against the list file's folder. Ids are the lines as written."""
    lines = list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    ids = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not ids:
        raise DinolabError(f"list file {list_file} has no image paths (blank lines and # comments ignored)")
    return [os.path.join(list_file.parent, i) for i in ids], ids


def list_images_with_ids(source: ImageSource) -> tuple[list[str], list[str]]:
    """Like ``list_images`` but also returns an id per image: the path relative to the folder
    (``/``-separated), the line of the list file, or the path as given."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _scan_folder(path)
        if not path.exists():
            raise DinolabError(f"image source {os.fspath(source)} does not exist")
        if path.suffix.lower() in LIST_FILE_EXTENSIONS:
            return _read_list_file(path)
        if _is_image_name(path.name):
            return [os.fspath(source)], [os.fspath(source)]
        raise DinolabError(
            f"{os.fspath(source)} is neither a folder, a .txt list file nor an image file "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    paths = [os.fspath(p) for p in source]
    if not paths:
        raise DinolabError("no images given: the list of paths is empty")
    return paths, list(paths)


def list_images(source: ImageSource) -> list[str]:
    """Image paths from a folder (recursive, sorted, extensions ``IMAGE_EXTENSIONS`` in any case,
    hidden files skipped), a ``.txt`` list file (one path per line, relative to the list file's
    folder, blank and ``#`` lines ignored), a single image file, or a list of paths (kept as
    given; missing files surface later as bad images). Raises ``DinolabError`` when nothing is found.
    """
    return list_images_with_ids(source)[0]


# --------------------------------------------------------------------------------------- decoding

_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _grey_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (see the module docstring for the
    choices on alpha, 16-bit and float images). May return ``img`` itself when it is already RGB."""
    if img.mode in _INT_MODES:
        # 16-bit data (also in mode "I", which Pillow uses for 16-bit PNGs/TIFFs): 65535 -> 255.
        return _grey_to_rgb(np.asarray(img).astype(np.float64).clip(0, 65535) / 257.0)
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:  # not in [0, 1]: stretch the range it has
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return _grey_to_rgb(a * 255.0)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """A copy of ``img`` rotated/flipped by its EXIF orientation (unchanged copy if none or broken)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001  (a broken EXIF block, whatever the error, is not a bad image)
        logger.debug("ignoring unreadable EXIF orientation of %s: %s", getattr(img, "filename", "?"), e)
        return img.copy()


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())  # one line: reasons end up in tab-separated files
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def load_rgb(path: str | os.PathLike | IO[bytes], *, name: str | None = None) -> Image.Image:
    """Decode an image file (or an open binary file, e.g. ``io.BytesIO`` of a tar member) to an 8-bit
    RGB ``PIL.Image`` with the EXIF orientation applied; ``name`` labels errors (default ``path``).

    Raises ``BadImageError`` (with the reason) for missing, unreadable, corrupt, truncated or
    non-image files, anything but a regular file (opening a named pipe would block) and
    decompression bombs; the full decode happens here, so a truncated file cannot slip through to
    the transform.
    """
    try:
        is_path = isinstance(path, (str, os.PathLike))
        if is_path and not stat.S_ISREG(os.stat(path).st_mode):  # open() of a named pipe blocks for ever
            raise BadImageError(path, "not a regular file (a folder, pipe, socket or device)")
        with Image.open(path) as img:
            img.load()  # decode now: truncation and corruption show up here
            return to_rgb(_upright(img))
    except (MemoryError, BadImageError):
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise BadImageError(name if name is not None else path, _reason(e)) from e


# ---------------------------------------------------------------------------- dataset and collate


class Sample(NamedTuple):
    """One item of ``ImageListDataset``: the image tensor, or ``None`` and the reason it failed."""

    index: int
    image: Tensor | None
    error: str | None


@dataclass
class Batch:
    """A collated batch: ``images`` (B, 3, H, W) of the good items (``None`` if none were good),
    their dataset ``indices``, and ``skipped`` (index, reason) for the bad ones."""

    indices: list[int]
    images: Tensor | None
    skipped: list[tuple[int, str]]

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageListDataset(Dataset):
    """Images from paths (decoded with ``load_rgb``), in-memory PIL images (``to_rgb``), or one
    uint8 array (N, H, W, 3) of decoded images (item i -> ``Image.fromarray(images[i])``; the array,
    e.g. a ``np.load(..., mmap_mode="r")`` memory map, is kept as is, not copied).

    ``__getitem__`` returns a ``Sample``; an image that cannot be decoded gives
    ``Sample(index, None, reason)`` instead of raising. Errors raised by ``transform`` itself
    propagate: they point at a wrong transform, not at a bad file.
    """

    def __init__(
        self, images: Sequence[str | os.PathLike | Image.Image] | np.ndarray,
        transform: Callable[[Image.Image], Tensor],
    ) -> None:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise DinolabError(
                    f"an image array must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            self.images = images
        else:
            self.images = list(images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, item: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
        if isinstance(item, np.ndarray):  # (H, W, 3) uint8 row of an image array
            return Image.fromarray(np.ascontiguousarray(item))  # RGB: shape checked above
        if not isinstance(item, Image.Image):
            return load_rgb(item)
        try:
            return to_rgb(item)
        except Exception as e:
            raise BadImageError("<in-memory image>", _reason(e)) from e

    def __getitem__(self, index: int) -> Sample:
        try:
            img = self._decode(self.images[index])
        except BadImageError as e:
            return Sample(index, None, e.reason)
        return Sample(index, self.transform(img), None)


def collate_skip_bad(samples: Sequence[Sample]) -> Batch:
    """Collate ``Sample``s: stack the good images, report the bad ones in ``Batch.skipped``."""
    good = [s for s in samples if s.image is not None]
    skipped = [(s.index, s.error or "unknown error") for s in samples if s.image is None]
    if len({tuple(s.image.shape) for s in good}) > 1:
        raise DinolabError(
            "the transform gave images of different sizes in one batch; use a fixed-size transform "
            "(e.g. make_classification_transform) or batch_size=1"
        )
    images = torch.stack([s.image for s in good]) if good else None
    return Batch([s.index for s in good], images, skipped)
