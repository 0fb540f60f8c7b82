"""Fixtures for the serve tests: a tiny random backbone behind the app, and picture helpers."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="serve tests need httpx (test extra)")

from fastapi.testclient import TestClient

from dinolab.models import create_model
from dinolab.serve.app import create_app
from dinolab.serve.registry import ServedModel
from dinolab.serve.settings import ServeSettings

SHORT = 32  # inference short side of the tiny model (patch 4 -> 8 patches)
BASE_URL = "http://127.0.0.1"  # the server refuses Host names it is not bound to (TestClient's "testserver")


def local_client(app, **kw) -> TestClient:
    """A ``TestClient`` for ``app`` that sends ``Host: 127.0.0.1``."""
    return TestClient(app, base_url=BASE_URL, **kw)


def tiny_backbone(seed: int = 0, dim_model: str = "vit_tiny_patch4") -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(dim_model, depth=2, img_size=32).eval()


def tiny_served(name: str = "tiny", seed: int = 0, **kw) -> ServedModel:
    return ServedModel.wrap(tiny_backbone(seed), name=name, short_side=SHORT, **kw)


def png_bytes(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode_b64_png(s: str) -> np.ndarray:
    data = base64.b64decode(s)
    assert data.startswith(b"\x89PNG"), "not a PNG"
    return np.asarray(Image.open(io.BytesIO(data)))


def photo(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A small RGB picture with structure (gradients + a bright square), deterministic."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 80)], -1).astype(np.float64)
    a[h // 4: h // 2, w // 4: w // 2] = (250, 240, 30)
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread than contending for a small machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def app():
    return create_app(ServeSettings(), models=[tiny_served()])


@pytest.fixture(scope="module")
def client(app):
    with local_client(app) as c:
        yield c
