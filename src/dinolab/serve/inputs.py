"""Turning untrusted uploads into RGB images, or into a precise 4xx error.

Checks, in order (each failure is a :class:`ServeError` with an HTTP status and a message that says
what was wrong and what to send instead):

1. size: empty (400) or more than ``max_bytes`` (413);
2. content sniffing: the first bytes must be a JPEG, PNG, GIF, BMP, TIFF or WebP signature, whatever
   the file name or the declared content type says (415);
3. the header's pixel count against ``max_pixels`` *before* decoding (413): a decompression bomb is
   refused without allocating it (Pillow's own ``DecompressionBombError`` is caught too);
4. sides shorter than ``min_side`` pixels (422);
5. a full decode restricted to the sniffed format: truncated or corrupt data is an error (422), never
   a half-grey picture (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).

The decoded image is converted like every other dinolab input (``dinolab.data.images.to_rgb``:
alpha composited on white, 16-bit scaled) after its EXIF orientation is applied.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from dinolab.data.images import to_rgb

# (signature at offset 0, Pillow format name). WebP is RIFF....WEBP, checked separately.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
ACCEPTED = "JPEG, PNG, GIF, BMP, TIFF or WebP"


class ServeError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, ``detail`` the one-line reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """Pillow format name of ``data`` from its leading bytes (``"PNG"``, ``"JPEG"``...), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    return None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int, what: str = "image"
                 ) -> Image.Image:
    """Decode uploaded bytes into an 8-bit RGB image, or raise :class:`ServeError` (see module doc).

    ``what`` names the field in messages (``"image"``, ``"image2"``).
    """
    if not data:
        raise ServeError(400, f"{what}: the upload is empty; send the bytes of a {ACCEPTED} file")
    if len(data) > max_bytes:
        raise ServeError(413, f"{what}: {len(data):,} bytes is more than the upload limit of {max_bytes:,} "
                         "bytes; send a smaller file (or start the server with a larger --max-upload-mb)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ServeError(415, f"{what}: the content is not an image (expected {ACCEPTED}, recognised by its "
                         "bytes, not its name)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServeError(413, f"{what}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001  (Pillow raises many types for a bad header)
        raise ServeError(422, f"{what}: not a readable {fmt} file, truncated or corrupt "
                         f"({_reason(e)})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ServeError(413, f"{what}: {w}x{h} = {w * h:,} pixels is more than the limit of "
                             f"{max_pixels:,}; "
                             "downscale it (or start the server with a larger --max-pixels)")
        if min(w, h) < min_side:
            raise ServeError(422, f"{what}: {w}x{h} is too small; both sides must be at least {min_side} px")
        try:
            img.load()  # the full decode: truncation and corruption surface here
            img = _upright(img)
            return to_rgb(img)
        except Exception as e:  # noqa: BLE001
            raise ServeError(422, f"{what}: truncated or corrupt {fmt} data ({_reason(e)})") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored, not an error."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
