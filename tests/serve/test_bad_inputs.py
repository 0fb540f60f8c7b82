"""Every task endpoint against the bad-input matrix: a precise 4xx JSON error (or 200 for odd but valid
images), never a 500, and the server stays up."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.curate.index import ExactIndex
from dinolab.serve.app import create_app
from dinolab.serve.heads import load_depth_head, load_seg_head
from dinolab.serve.settings import ServeSettings

from .conftest import local_client, photo, png_bytes, tiny_served
from .test_heads import _depth_head, _seg_head


def _png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb(side: int = 20000) -> bytes:
    """A real, complete 20000 x 20000 1-bit PNG (400 megapixels) in about 50 kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 500) for _ in range(side // 500)) + z.flush()
    return _png(side, side, 1, 0, idat)


@functools.lru_cache(maxsize=1)
def cases() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, expected status, words in the detail)."""
    img = photo()
    frames = io.BytesIO()
    photo(0).save(frames, format="GIF", save_all=True, append_images=[photo(1), photo(2)], duration=40)
    grey16 = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    good = png_bytes(img)
    return {
        "corrupt": (good[:60] + bytes(np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8)), 422,
                    "corrupt"),
        "truncated": (good[: len(good) // 2], 422, "truncated"),
        "zero bytes": (b"", 400, "empty"),
        "text named .png": (b"just some text, not a picture\n" * 10, 415, "not an image"),
        "1x1": (png_bytes(Image.new("RGB", (1, 1))), 422, "too small"),
        "20000x20000 bomb": (_bomb(), 413, "decompression bomb"),
        "animated gif": (frames.getvalue(), 200, ""),
        "cmyk jpeg": (png_bytes(img.convert("CMYK"), "JPEG"), 200, ""),
        "16-bit png": (png_bytes(grey16), 200, ""),
        "16x3000 strip": (png_bytes(photo(size=(16, 3000))), 200, ""),  # one patch wide
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Every endpoint can run: heads for segmentation and depth, an index for search."""
    tmp = tmp_path_factory.mktemp("bad")
    served = tiny_served()
    served.seg_head = load_seg_head(str(_seg_head(tmp / "seg.pth")), served.backbone)
    served.depth_head = load_depth_head(str(_depth_head(tmp / "depth.pth")), served.backbone)
    index = ExactIndex(torch.randn(4, 192), list("abcd"), model_id="tiny", info={"resize": 32, "crop": 32})
    with local_client(create_app(ServeSettings(), models=[served], index=index)) as c:
        yield c


ROUTES = [("/v1/embed", "image"), ("/v1/pca", "image"), ("/v1/segment", "image"), ("/v1/depth", "image"),
          ("/v1/search", "image"), ("/v1/match", "image"), ("/v1/match", "image2")]


@pytest.mark.parametrize("case", list(cases()))
@pytest.mark.parametrize("route, field", ROUTES, ids=[f"{r}:{f}" for r, f in ROUTES])
def test_bad_inputs_on_every_endpoint(client, route, field, case):
    data, status, words = cases()[case]
    files = {field: ("photo.png", data, "image/png")}
    form = {}
    if route == "/v1/match":  # the other image is a good sample photo
        form = {"gallery2": "coffee"} if field == "image" else {"gallery": "coffee"}
    r = client.post(route, files=files, data=form)
    assert r.status_code == status, (route, field, case, r.text[:300])
    assert r.headers["content-type"] == "application/json"
    if status != 200:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail and "\n" not in detail
        assert detail.startswith(f"{field}:"), detail  # names the field
    assert client.get("/healthz").json()["status"] == "ok"
