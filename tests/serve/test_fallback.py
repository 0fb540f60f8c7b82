"""The self-pretrained fallback model: a few-step version of the real path (the full one is slow)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from PIL import Image

from dinolab.models import load_model
from dinolab.serve import fallback
from dinolab.serve.gallery import PHOTOS

TINY = ["model.depth=1", "train.epochs=1", "train.iters_per_epoch=2", "train.batch_size_per_gpu=4",
        "crops.n_local=1", "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
        "loss.warmup_teacher_temp_epochs=1", "train.checkpoint_every=0"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path))
    return tmp_path


def test_recipe_hash_ignores_the_output_folder_only():
    cfg = fallback.fallback_config()
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir="/elsewhere"))
    assert fallback.config_hash(moved) == fallback.config_hash(cfg)
    assert fallback.config_hash(fallback.fallback_config(["train.epochs=7"])) != fallback.config_hash(cfg)
    assert cfg.model.arch == "vit_tiny_patch8" and cfg.train.epochs * cfg.train.iters_per_epoch == 120


def test_few_step_fallback_trains_once_then_comes_from_the_cache(cache, monkeypatch, one_thread):
    assert fallback.cached_fallback(TINY) is None
    path = fallback.ensure_fallback(TINY, device="cpu", progress=False)
    run = path.parent
    assert run.parent == cache / "fallback"
    assert run.name == fallback.config_hash(fallback.fallback_config(TINY))
    model = load_model(path)
    assert (model.patch_size, len(model.blocks), model.embed_dim) == (8, 1, 192)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.grid == (8, 12) and torch.isfinite(out.cls_token).all()
    photos = sorted(p.stem for p in (run / "photos").glob("*.png"))
    assert photos == sorted(PHOTOS)
    assert min(Image.open(run / "photos" / "chelsea.png").size) == fallback.PHOTO_SHORT_SIDE
    assert json.loads((run / "results.json").read_text())["iterations"] == 2
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()

    def no_training(*a, **k):
        raise AssertionError("the cached fallback must not be trained again")
    monkeypatch.setattr("dinolab.train.loop.train", no_training)
    assert fallback.ensure_fallback(TINY, progress=False) == path
    assert fallback.cached_fallback(TINY) == path


@pytest.mark.slow
def test_full_fallback_recipe_within_budget(tmp_path, monkeypatch):
    """The shipped recipe on this machine: time it and check the features did not collapse."""
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    path = fallback.ensure_fallback(device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    model = load_model(path)
    from dinolab.serve.gallery import load_photo
    from dinolab.serve.tasks import forward

    cls = torch.stack([forward(model, load_photo(p), short_side=160, max_side=320).cls for p in PHOTOS])
    spread = torch.nn.functional.normalize(cls, dim=1).std(0).sum().item()
    print(f"fallback pretraining: {seconds:.0f} s; CLS spread across the 16 photos {spread:.3f}")
    assert spread > 0.05, "the fallback's CLS features collapsed to one point"
    assert seconds < 600


def test_fallback_training_keeps_monitor_warnings_out_of_the_serve_log(caplog):
    """The demo recipe's monitor warnings (no knob for a serve user) are silenced while it trains,
    and the logger is restored afterwards."""
    import logging

    from dinolab.train.monitor import CollapseMonitor

    monitor_log = logging.getLogger("dinolab.train.monitor")
    before = monitor_log.level
    with caplog.at_level(logging.WARNING):
        with fallback._quiet_monitor():
            m = CollapseMonitor(64, grace=1, every=1)
            m.update(1, {"prototypes_in_use": 1.0, "cls_std_x_sqrt_d": 0.0, "dino": 4.16, "log_k": 4.16})
        assert len(m.warnings) == 3  # found and kept for results.json ...
        assert not [r for r in caplog.records if r.name == "dinolab.train.monitor"]  # ... but not logged
        m.log_warnings()
        assert len([r for r in caplog.records if r.name == "dinolab.train.monitor"]) == 3
    assert monitor_log.level == before
