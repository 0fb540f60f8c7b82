"""A training run folder's bookkeeping around a resume.

- :func:`check_resume`: what changed since the checkpoint being resumed (every config field that
  changes what is learnt, see ``IGNORED``, and the training data). A change is refused with the list of differences
  unless forced; every resume, forced or not, is appended to ``resumes.jsonl`` (``config.yaml`` keeps
  the config the run started with; each checkpoint holds the config and data it was trained with).
- :func:`truncate_logs`: ``metrics.jsonl`` / ``knn.jsonl`` cut back to the resumed iteration, so the
  iterations between the last checkpoint and a kill are not logged twice.
- :func:`nonfinite_tensors`: the names of floating-point tensors holding NaN or inf.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from dinolab.errors import DinolabError
from dinolab.io import atomic_write_text

log = logging.getLogger(__name__)

LOGS = ("metrics.jsonl", "knn.jsonl")  # one JSON row per line, each with an "iteration"
# How a run is executed and recorded, not what it learns: these may change on a resume. The run folder
# may move; the data loader's workers, the parallel mode (checkpoints hold the full state) and
# compilation or recomputation do not change the batches or the maths; the rest is bookkeeping.
IGNORED = frozenset(f"train.{k}" for k in ("output_dir", "num_workers", "parallel", "compile", "log_every",
                                           "activation_checkpointing", "checkpoint_every", "keep_last",
                                           "eval_every"))


def data_record(source: str, n_images: int) -> dict[str, Any]:
    """What a run trains on: the source (a path made absolute, or e.g. ``cifar10:train``) and its size."""
    path = Path(source)
    return {"source": str(path.resolve()) if path.exists() else source, "n_images": int(n_images)}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def resume_changes(checkpoint: dict[str, Any], config: dict[str, Any], data: dict[str, Any]) -> dict[str, list]:
    """``{key: [checkpoint's value, new value]}`` for each config field (``config_to_dict`` form) and
    data entry (``data.source``, ``data.n_images``) that differs; a key the checkpoint lacks (an older
    version) is not compared."""
    old = _flat(checkpoint.get("config") or {}) | _flat({"data": checkpoint.get("data") or {}})
    new = _flat(config) | _flat({"data": data})
    return {k: [old[k], v] for k, v in new.items() if k in old and k not in IGNORED and old[k] != v}


def check_resume(run_dir: Path, path: Path, checkpoint: dict[str, Any], config: dict[str, Any],
                 data: dict[str, Any], *, force: bool, write: bool) -> dict[str, list]:
    """Refuse to resume ``checkpoint`` (at ``path``) with another config or data unless ``force``;
    append the resume to ``run_dir/resumes.jsonl`` when ``write`` (rank 0). Returns the changes."""
    changes = resume_changes(checkpoint, config, data)
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if changes and not force:
        raise DinolabError(
            f"refusing to resume {path}: it was trained with other settings ({listed}); resume with the "
            f"original ones (config.yaml, and any forced changes in resumes.jsonl, in {run_dir}), use another "
            "train.output_dir, or pass --force to resume with the new settings (recorded in resumes.jsonl)")
    if changes:
        log.warning("resuming %s with changed settings (--force): %s", path, listed)
    if write:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "iteration": int(checkpoint["iteration"]),
               "checkpoint": path.name, "data": data, "forced": bool(changes), "changes": changes}
        with (run_dir / "resumes.jsonl").open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    return changes


def _row_iteration(line: str) -> int | None:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not a row
        return None


def truncate_logs(run_dir: Path, iteration: int) -> None:
    """Drop the rows after ``iteration`` (and broken lines) from the run's JSONL logs, atomically."""
    for name in LOGS:
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        keep = [ln for ln in lines if (i := _row_iteration(ln)) is not None and i <= iteration]
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))
            log.info("%s: dropped %d rows after iteration %d (logged after the checkpoint)", path,
                     len(lines) - len(keep), iteration)


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
