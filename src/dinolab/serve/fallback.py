"""The self-pretrained fallback model of ``dinolab serve``: used when no official weights can be had.

Offline and without cached official weights, the server still starts: it pretrains a small ViT
(``fallback.yaml`` next to this file: ViT-Tiny/8, 4 blocks without LayerScale, 120 steps of 32
images) with dinolab's own DINOv2 recipe (``dinolab.train.loop.train``) on the photos bundled with
scikit-image (:data:`dinolab.serve.gallery.PHOTOS`, short side resized to :data:`PHOTO_SHORT_SIDE`),
in about 3 minutes on 2 idle CPU cores (about 170 s of single-thread CPU time), and caches it::

    $DINOLAB_CACHE/fallback/<config hash>/     (default ~/.cache/dinolab/fallback/...)
        photos/*.png            the training photos
        config.yaml, metrics.jsonl, checkpoints/, loss.png, results.json   (the training run folder)
        teacher_backbone.pth    the exported teacher (official layout) + .json architecture sidecar

The hash covers the resolved config and the photo list, so a changed recipe trains a new model and
an unchanged one is trained once. A file lock keeps two servers starting at once from training twice;
a killed training resumes from its last checkpoint on the next start.

Example::

    path = ensure_fallback()                 # trains on first use (progress bar), then cached
    model = dinolab.load_model(path)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from PIL import Image

from dinolab.config import Config, config_to_dict, load_config
from dinolab.io import atomic_write
from dinolab.serve.gallery import PHOTOS, load_photo

log = logging.getLogger(__name__)

FALLBACK_NAME = "dinolab-fallback"
PHOTO_SHORT_SIDE = 256  # training photos are stored this small: global crops are 64 px anyway
SERVE_SHORT_SIDE = 160  # inference resolution for the fallback model (20 x ~30 patches of 8 px)
_DATA_VERSION = 1  # bump when the photo preparation changes: it is part of the cache key


def fallback_root() -> Path:
    """``$DINOLAB_CACHE/fallback`` (default ``~/.cache/dinolab/fallback``)."""
    return Path(os.environ.get("DINOLAB_CACHE", Path.home() / ".cache" / "dinolab")) / "fallback"


def fallback_config(overrides: Sequence[str] = ()) -> Config:
    """The packaged fallback recipe (``fallback.yaml``) with ``a.b=value`` overrides applied.

    ``train.output_dir`` is not part of the recipe: :func:`ensure_fallback` sets it to the cache folder.
    """
    path = resources.files("dinolab.serve") / "fallback.yaml"
    with resources.as_file(path) as p:
        return load_config(p, overrides)


def config_hash(cfg: Config) -> str:
    """16 hex digits of SHA-256 over the recipe (without ``train.output_dir``) and the photo set."""
    d = config_to_dict(cfg)
    d["train"].pop("output_dir", None)
    key = {"config": d, "photos": sorted(PHOTOS), "short_side": PHOTO_SHORT_SIDE, "data": _DATA_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def fallback_dir(cfg: Config | None = None) -> Path:
    """The cache folder of the fallback model trained with ``cfg`` (default: the packaged recipe)."""
    return fallback_root() / config_hash(cfg or fallback_config())


def write_training_photos(folder: str | os.PathLike) -> list[Path]:
    """Write the gallery photos, short side resized to :data:`PHOTO_SHORT_SIDE`, as PNGs (atomically)."""
    folder = Path(folder)
    out = []
    for pid in PHOTOS:
        path = folder / f"{pid}.png"
        if not path.is_file():
            img = load_photo(pid)
            scale = PHOTO_SHORT_SIDE / min(img.size)
            size = (round(img.width * scale), round(img.height * scale))
            small = img.resize(size, Image.Resampling.BICUBIC)
            atomic_write(path, lambda f, im=small: im.save(f, format="PNG"), fsync=False)
        out.append(path)
    return out


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``; no locking where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: two simultaneous first starts would both train; harmless but slow
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_fallback(overrides: Sequence[str] = ()) -> Path | None:
    """Path of the trained fallback backbone if it is in the cache, else None (never trains)."""
    path = fallback_dir(fallback_config(overrides)) / "teacher_backbone.pth"
    return path if path.is_file() else None


def ensure_fallback(overrides: Sequence[str] = (), *, device: str | None = None,
                    progress: bool = True) -> Path:
    """Path of the fallback backbone (``teacher_backbone.pth``), pretraining it first if not cached.

    Args:
        overrides: ``a.b=value`` changes to the recipe (tests use a few-step version); a different
            recipe is a different cache entry.
        device: where to train (default: CUDA when available, else CPU).
        progress: show the training progress bar.
    """
    from dinolab.train.loop import train

    cfg = fallback_config(overrides)
    run_dir = fallback_dir(cfg)
    export = run_dir / "teacher_backbone.pth"
    with _file_lock(run_dir.with_name(run_dir.name + ".lock")):
        if export.is_file():  # cached, or another process finished it while we waited for the lock
            _ensure_unit_layerscale(export, cfg)
            return export
        photos = run_dir / "photos"
        write_training_photos(photos)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(run_dir)))
        log.info("pretraining the fallback model into %s (%d steps; cached for later starts)", run_dir,
                 cfg.train.epochs * cfg.train.iters_per_epoch)
        with _quiet_monitor():  # a demo recipe: the user of `serve` has no knob to turn
            train(cfg, str(photos), device=device, progress=progress)
        if not export.is_file():
            raise RuntimeError(f"fallback pretraining finished without writing {export}")
        _ensure_unit_layerscale(export, cfg)
    return export


@contextlib.contextmanager
def _quiet_monitor():
    """Keep the pretraining monitor's warnings (weak learning signal ...) out of the serve log while
    the fallback trains; they stay in the fallback run's results.json."""
    monitor_log = logging.getLogger("dinolab.train.monitor")
    level = monitor_log.level
    monitor_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        monitor_log.setLevel(level)


def _ensure_unit_layerscale(path: Path, cfg: Config) -> None:
    """Give a backbone trained without LayerScale LayerScale gammas of 1 (the same function), in place.

    ``dinolab.load_model`` builds backbones with LayerScale, so a checkpoint without the
    ``blocks.N.ls{1,2}.gamma`` tensors would not load strictly; gammas of exactly 1 change nothing.
    Nothing happens when the recipe uses LayerScale or the file already has them.
    """
    if cfg.model.layerscale is not None:
        return
    from dinolab.config import backbone_kwargs
    from dinolab.models.checkpoints import save_official
    from dinolab.models.safe_load import safe_torch_load
    from dinolab.models.vit import DinoVisionTransformer

    model = DinoVisionTransformer(**(backbone_kwargs(cfg.model) | {"layerscale": 1.0, "drop_path_rate": 0.0}))
    missing, unexpected = model.load_state_dict(safe_torch_load(path), strict=False)
    if unexpected or any(".ls1.gamma" not in k and ".ls2.gamma" not in k for k in missing):
        raise RuntimeError(f"{path}: unexpected layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if missing:
        save_official(model.eval(), path)
