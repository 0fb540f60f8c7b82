"""Generators of good, convertible and bad image files for ``tests/test_bad_inputs.py``.

Every file is made in a temporary folder; nothing is downloaded. ``GOOD`` files must decode to RGB
(``expected_size`` is the upright size after EXIF orientation), ``BAD`` files must be skipped with a
reason. The PNG bomb is 20000 x 20000 px in ~50 KB: its header alone must get it refused.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 24, 16  # stored size of the ordinary test pictures (landscape, so a rotation shows)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgb_array(seed: int = 0, size: tuple[int, int] = (W, H)) -> np.ndarray:
    return _rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def rgb_jpeg(path: Path, seed: int = 0) -> Path:
    return _save(Image.fromarray(_rgb_array(seed)), path, quality=90)


def rgba_png(path: Path) -> Path:
    a = np.dstack([_rgb_array(1), np.full((H, W), 128, np.uint8)])
    a[:, : W // 2, 3] = 0  # left half fully transparent
    return _save(Image.fromarray(a, "RGBA"), path)


def gray_png(path: Path) -> Path:
    return _save(Image.fromarray(_rgb_array(2)[..., 0], "L"), path)


def gray16_png(path: Path) -> Path:
    a = (_rgb_array(3)[..., 0].astype(np.uint16) * 257)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    return _save(img, path)


def cmyk_jpeg(path: Path) -> Path:
    return _save(Image.fromarray(_rgb_array(4)).convert("CMYK"), path, quality=95)


def palette_png(path: Path) -> Path:
    return _save(Image.fromarray(_rgb_array(5)).quantize(16), path)


def animated_gif(path: Path) -> Path:
    frames = [Image.fromarray(_rgb_array(10 + i)).quantize(32) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, transparency=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    return path


def one_pixel_png(path: Path) -> Path:
    return _save(Image.new("RGB", (1, 1), (200, 10, 10)), path)


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored W x H, EXIF orientation 6 (display rotated 90 degrees clockwise): upright H x W."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(_rgb_array(6)), path, exif=exif, quality=90)


def webp(path: Path) -> Path:
    return _save(Image.fromarray(_rgb_array(7)), path, quality=90)


def tiff(path: Path) -> Path:
    return _save(Image.fromarray(_rgb_array(8)), path)


def corrupt_jpeg(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0" + _rng(20).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(21, (64, 64))).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_as_png(path: Path) -> Path:
    path.write_text("this is a text file with an image name\n")
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit greyscale PNG of side x side pixels (all black) whose file is ~50 KB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 500) for _ in range(side // 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path


def dangling_symlink(path: Path) -> Path:
    os.symlink(path.with_name("does-not-exist.png"), path)
    return path


def fifo(path: Path) -> Path:
    """A named pipe with an image name: opening it for reading would block until a writer comes."""
    os.mkfifo(path)
    return path


GOOD: dict[str, tuple[Callable[[Path], Path], tuple[int, int]]] = {
    "rgb.jpg": (rgb_jpeg, (W, H)),
    "rgba.png": (rgba_png, (W, H)),
    "gray.png": (gray_png, (W, H)),
    "gray16.png": (gray16_png, (W, H)),
    "cmyk.jpg": (cmyk_jpeg, (W, H)),
    "palette.png": (palette_png, (W, H)),
    "animated.gif": (animated_gif, (W, H)),
    "one_pixel.png": (one_pixel_png, (1, 1)),
    "exif_rotated.jpg": (exif_rotated_jpeg, (H, W)),
    "photo.webp": (webp, (W, H)),
    "photo.tif": (tiff, (W, H)),
    "with space.jpg": (rgb_jpeg, (W, H)),
    "ünïcødé ☃ 写真.jpg": (rgb_jpeg, (W, H)),
}

BAD: dict[str, Callable[[Path], Path]] = {
    "corrupt.jpg": corrupt_jpeg,
    "truncated.jpg": truncated_jpeg,
    "empty.png": empty_file,
    "text.png": text_as_png,
    "bomb.png": png_bomb,
    "dangling.png": dangling_symlink,
    "pipe.png": fifo,
}


def make_folder(folder: Path, good: bool = True, bad: bool = True, unreadable: bool = False) -> Path:
    """``folder`` with the ``GOOD`` and/or ``BAD`` files (in a ``sub/`` folder for half of them, so
    the ids are relative paths), plus a chmod-000 file when ``unreadable`` (meaningless as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    names = [*(GOOD if good else {}), *(BAD if bad else {})]
    for k, name in enumerate(names):
        make = GOOD[name][0] if name in GOOD else BAD[name]
        make((folder / "sub" if k % 2 else folder) / name)
    if unreadable:
        p = rgb_jpeg(folder / "unreadable.jpg")
        p.chmod(0)
    return folder


def rel_ids(good: bool = True, bad: bool = True) -> tuple[list[str], list[str]]:
    """The ids ``make_folder`` gives its good and bad files (relative, ``/``-separated)."""
    names = [*(GOOD if good else {}), *(BAD if bad else {})]
    ids = [f"sub/{n}" if k % 2 else n for k, n in enumerate(names)]
    return [i for i in ids if i.split("/")[-1] in GOOD], [i for i in ids if i.split("/")[-1] in BAD]
