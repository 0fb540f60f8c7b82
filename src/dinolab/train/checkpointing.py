"""Training checkpoints: atomic writes, keep-last-k, exact resume, and a clean stop on SIGTERM.

Layout: ``run_dir/checkpoints/ckpt-{iteration:08d}.pt``, one ``torch.save`` dict per file holding
the caller's state (state dicts, tensors, ints, floats, strings) plus ``"iteration"`` and ``"rng"``.
There is no ``latest`` pointer file: the latest checkpoint is the highest iteration found by name,
so nothing can go stale. Files are written through :func:`dinolab.io.atomic_write`, so a final name
always holds a complete file; temp files (``.ckpt-*.tmp``) are never picked, and the ones a killed
write leaves are removed after the next successful save (and by the training loop at start). A
failed write (disk full) raises :class:`DinolabError` and leaves the previous checkpoints as they were.

Everything is loaded with ``dinolab.models.checkpoints.safe_torch_load`` (``weights_only=True`` plus
numpy data types only: no arbitrary code from a checkpoint), so the RNG states of numpy and Python
``random`` are stored as tensors, lists and ints.

In a multi-process run only rank 0 should call :func:`save_checkpoint`; its RNG state is what gets
saved, so other ranks should load with ``restore_rng=False`` and re-seed themselves (seed + rank).
Rolling back to an earlier checkpoint means deleting the later ones, or they stay "latest".
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from dinolab.errors import DinolabError
from dinolab.io import atomic_write
from dinolab.models.safe_load import UnsafeFileError, safe_torch_load

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"ckpt-(\d+)\.pt")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """The folder holding a run's checkpoints: ``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy global, torch CPU and (when CUDA is in use) all CUDA RNG states.

    Only plain containers, ints, floats, strings and tensors, so it loads under ``weights_only``.
    """
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # uint32[624] -> int64 tensor
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    # An uninitialised CUDA context has drawn nothing; querying it would start CUDA needlessly.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`; CUDA states only where devices exist."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if not cuda_states:
        return
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_devices != len(cuda_states):
        log.warning(
            "checkpoint has CUDA RNG states for %d devices, this process sees %d; restoring %d",
            len(cuda_states), n_devices, min(n_devices, len(cuda_states)),
        )
    for i, s in enumerate(cuda_states[:n_devices]):
        torch.cuda.set_rng_state(s, device=i)


def _scan(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.fullmatch(p.name)))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every final-named checkpoint in the run, lowest iteration first."""
    return _scan(checkpoint_dir(run_dir))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest iteration in the file name, or ``None`` when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike, iteration: int, state: dict[str, Any], *, keep_last: int = 3
) -> Path:
    """Write ``state`` plus ``"iteration"`` and ``"rng"`` atomically; prune all but the last ``keep_last``.

    ``state`` keys ``"iteration"`` and ``"rng"`` are overwritten. ``keep_last=0`` keeps every
    checkpoint; the file just written is never pruned. Returns the checkpoint path.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    path = checkpoint_dir(run_dir) / f"ckpt-{iteration:08d}.pt"
    payload = {**state, "iteration": int(iteration), "rng": rng_state()}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:  # disk full, quota, I/O error: atomic_write removed its temp file
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise DinolabError(f"cannot write checkpoint {path} ({e.strerror or e}); {kept}: free some space "
                           "and run the same command again to resume") from e
    log.info("saved checkpoint %s", path)
    remove_stale_temp_files(run_dir)
    if keep_last:
        others = [p for _, p in list_checkpoints(run_dir) if p != path]
        for old in others[: max(len(others) - (keep_last - 1), 0)]:
            old.unlink(missing_ok=True)
            log.info("pruned checkpoint %s (keep_last=%d)", old, keep_last)
    return path


def remove_stale_temp_files(run_dir: str | os.PathLike) -> int:
    """Delete the ``.ckpt-*.tmp`` files a killed checkpoint write left in the run's checkpoint folder
    (only one process writes checkpoints, so any found between writes are stale); how many."""
    stale = list(checkpoint_dir(run_dir).glob(".ckpt-*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
        log.info("removed %s (left by an interrupted checkpoint write)", p)
    return len(stale)


def _previous_hint(path: Path) -> str:
    """What to do about a broken ``path``: name the newest older checkpoint beside it, if any."""
    m = _CKPT_RE.fullmatch(path.name)
    this = int(m.group(1)) if m else float("inf")
    older = [p for it, p in _scan(path.parent) if it < this]
    if older:
        return f"; delete it and resume from the previous checkpoint {older[-1]}"
    return "; delete it (no earlier checkpoint in that folder) and start again"


def load_checkpoint(path: str | os.PathLike, *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``safe_torch_load``; restore the RNG states unless told not to.

    Raises :class:`DinolabError` when the file is missing, corrupt or truncated (naming the
    previous checkpoint to fall back to), and ``UnsafeFileError`` when it pickles anything but data.
    """
    path = Path(path)
    if not path.is_file():
        raise DinolabError(f"checkpoint {path} does not exist")
    try:
        ckpt = safe_torch_load(path)
    except UnsafeFileError:
        raise
    except DinolabError as exc:  # corrupt or truncated: name the checkpoint to fall back to
        raise DinolabError(f"{exc}{_previous_hint(path)}") from None
    if not isinstance(ckpt, dict) or "iteration" not in ckpt:
        raise DinolabError(f"{path} is not a dinolab training checkpoint (no 'iteration' entry)")
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    log.info("loaded checkpoint %s (iteration %d)", path, ckpt["iteration"])
    return ckpt


class GracefulExit:
    """Turn SIGTERM / SIGINT into a flag the training loop polls after each step.

    The first signal sets ``requested`` (the loop then saves a checkpoint and returns); a second
    SIGINT restores the previous SIGINT handler and raises ``KeyboardInterrupt`` at once. Further
    SIGTERMs are only logged (schedulers follow with SIGKILL after their grace period). Previous
    handlers come back on exit. Python only allows handlers in the main thread: elsewhere this is
    a no-op and ``requested`` stays False. In multi-process runs the loop should all-reduce the
    flag so that every rank stops at the same step.

    >>> with GracefulExit() as stop:          # doctest: +SKIP
    ...     for it in range(start, total):
    ...         step(it)
    ...         if stop.requested:
    ...             save_checkpoint(run_dir, it + 1, state)
    ...             break
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            log.warning("second SIGINT: stopping now without a checkpoint")
            signal.signal(signum, self._previous.pop(signum, signal.default_int_handler))
            raise KeyboardInterrupt
        if self.requested:
            log.warning("%s received again; the stop is already under way", name)
            return
        self.requested, self.signal_name = True, name
        log.warning("%s received: will save a checkpoint and stop after this step", name)

    def __enter__(self) -> GracefulExit:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.requested, self.signal_name = False, None
        if threading.current_thread() is not threading.main_thread():
            log.debug("GracefulExit outside the main thread: signal handlers not installed")
            return self
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            # None: a handler installed outside Python; SIG_DFL is the closest we can put back.
            self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
