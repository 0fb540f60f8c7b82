"""Shared test fixtures."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def one_thread():
    """Small tensor work runs faster on one intra-op thread than contending for this machine's 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free loopback TCP port (rendezvous of the spawned gloo test processes)."""
    return _free_port


def _tiny_vit_checkpoint(path, depth: int = 2):
    """A seeded random ViT-Ti/8 with LayerScale 1 (so its random CLS token sees the image), saved in the
    official layout at ``path``; returns the path."""
    from dinolab.models import create_model, save_official

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch8", depth=depth)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return save_official(model, path)


@pytest.fixture(scope="session")
def tiny_vit_checkpoint():
    """A function writing a small random backbone checkpoint: ``tiny_vit_checkpoint(path) -> path``."""
    return _tiny_vit_checkpoint


def random_pngs(folder, n: int, side: int, name: str = "{i}.png", seed: int = 0):
    """Write ``n`` random RGB PNGs of ``side`` x ``side`` px into ``folder`` (named ``name.format(i=...)``)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / name.format(i=i))
    return folder


@pytest.fixture(scope="module")
def corrupt_image_folder(tmp_path_factory):
    """13 images of 32 x 32 px (uneven shards for 2 ranks) of which one is corrupt."""
    d = random_pngs(tmp_path_factory.mktemp("imgs"), 12, 32, "img{i:02d}.png")
    (d / "img05b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d
