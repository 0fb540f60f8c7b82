"""Collapse monitoring and loss plots for pretraining runs.

DINO-style training can collapse — every image mapped to the same output — most often on small or
homogeneous custom data and small batches. Three signals, logged every step by ``SSLMetaArch``:

- ``prototypes_in_use``: exp(entropy of the batch-mean teacher target). Healthy runs spread over
  many prototypes; a collapsed teacher puts the whole batch on a handful (-> 1).
- ``cls_std_x_sqrt_d``: per-dimension std of the L2-normalised student CLS tokens, times sqrt(D);
  about 1 for well-spread features, -> 0 when all images give the same feature.
- ``dino`` against ``log_k``: a DINO loss at (or within 5% of) log K means near-uniform,
  uninformative targets: no collapse, but little learning either — the usual state of a short run
  with the official LayerScale / EMA / temperature schedules (measured: benchmarks/README.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path

from dinolab.io import atomic_save_figure

log = logging.getLogger(__name__)

ADVICE = ("usual remedies: a longer teacher-temperature warm-up (loss.warmup_teacher_temp_epochs) or a lower "
          "teacher temperature, Sinkhorn-Knopp centering (loss.centering=sinkhorn_knopp), a larger batch, a "
          "lower learning rate or longer warm-up (optim.base_lr, optim.warmup_epochs), KoLeo "
          "(loss.koleo_weight), and checking that the images are varied enough")
SHORT_RUN_ADVICE = ("the official schedules are made for 100k+ steps and may sit here for their first few "
                    "thousand; for short runs, as the small-cpu preset does: model.layerscale=null, a teacher "
                    "that follows the student (optim.momentum_teacher=0.98 optim.final_momentum_teacher=0.996) "
                    "and sharp targets (loss.teacher_temp=0.04 loss.warmup_teacher_temp=0.04)")
WEAK_SIGNAL_FRACTION = 0.95  # DINO loss above this share of log K: near-uniform teacher targets


class CollapseMonitor:
    """Keeps the recent collapse signals and turns them into warnings (checked every ``every`` steps
    after ``grace`` steps, and at the end). Each kind of warning is logged the first time it is seen,
    with what usually helps, and kept for the run summary."""

    def __init__(self, out_dim: int, *, window: int = 20, grace: int = 100, every: int = 100) -> None:
        self.out_dim, self.grace, self.every = out_dim, grace, every
        self.recent: deque[dict] = deque(maxlen=window)
        self.warnings: list[str] = []
        self._kinds: set[str] = set()

    def update(self, iteration: int, metrics: dict) -> None:
        self.recent.append({k: metrics[k] for k in ("prototypes_in_use", "cls_std_x_sqrt_d", "dino", "log_k")})
        if iteration >= self.grace and iteration % self.every == 0:
            self.check(iteration)

    def _mean(self, key: str) -> float:
        return sum(r[key] for r in self.recent) / len(self.recent)

    def check(self, iteration: int) -> list[str]:
        """New warnings for the current window: each kind only the first time (also logged and kept in
        ``self.warnings``)."""
        if not self.recent:
            return []
        found = []  # (kind, warning, advice)
        in_use, spread = self._mean("prototypes_in_use"), self._mean("cls_std_x_sqrt_d")
        dino, log_k = self._mean("dino"), self._mean("log_k")
        if in_use < max(2.0, 0.01 * self.out_dim):
            found.append(("prototypes", (f"collapse suspected at iteration {iteration}: the teacher uses ~{in_use:.1f} of "
                          f"{self.out_dim} prototypes"), ADVICE))
        if spread < 0.1:
            found.append(("spread", (f"collapse suspected at iteration {iteration}: student features have spread "
                          f"{spread:.3f} (about 1 is healthy)"), ADVICE))
        if dino > WEAK_SIGNAL_FRACTION * log_k:
            found.append(("signal", (f"weak learning signal at iteration {iteration}: DINO loss {dino:.3f} is within "
                          f"{1 - WEAK_SIGNAL_FRACTION:.0%} of log K = {log_k:.3f} (near-uniform teacher targets)"),
                          SHORT_RUN_ADVICE))
        new = [f"{w}; {advice}" for kind, w, advice in found if kind not in self._kinds]
        self._kinds.update(kind for kind, _, _ in found)
        for w in new:
            log.warning(w)
        self.warnings += new
        return new

    def log_warnings(self) -> None:
        """Log every warning so far again (end of run), on this module's logger."""
        for w in self.warnings:
            log.warning(w)

    def summary(self) -> dict:
        """Last-window means of the signals and all warnings, for ``results.json``."""
        if not self.recent:
            return {"collapse_warnings": self.warnings}
        keys = ("prototypes_in_use", "cls_std_x_sqrt_d", "dino", "log_k")
        return {"final": {k: self._mean(k) for k in keys}, "collapse_warnings": self.warnings}


def plot_losses(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Loss components and collapse signals against iteration, from ``metrics.jsonl`` (None: no rows)."""
    from matplotlib.figure import Figure

    if not metrics_jsonl.is_file():  # e.g. every step was skipped
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    it = [r["iteration"] for r in rows]
    fig = Figure(figsize=(10, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    for key in ("loss", "dino", "ibot", "koleo"):
        ax1.plot(it, [r[key] for r in rows], label=key)
    ax1.axhline(rows[-1]["log_k"], ls="--", c="grey", lw=0.8, label="log K")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss (cross-entropy in nats; KoLeo: -log distance)")
    ax1.legend(fontsize=8)
    ax2.plot(it, [math.log10(max(r["prototypes_in_use"], 1.0)) for r in rows], label="log10 prototypes in use")
    ax2.plot(it, [r["cls_std_x_sqrt_d"] for r in rows], label="CLS spread (std x sqrt D)")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("collapse signals")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, out_png)


class KnnMonitor:
    """Periodic kNN accuracy of the teacher backbone on a labelled (train, test) pair (k=20, T=0.07).

    Under torchrun every rank must call it (feature extraction is sharded); rank 0 writes ``knn.jsonl``.
    """

    def __init__(self, train_spec: str, test_spec: str, crop: int, run_dir: Path) -> None:
        from dinolab.data.datasets import resolve_dataset

        self.train, self.test = resolve_dataset(train_spec), resolve_dataset(test_spec)
        self.resize = crop if crop <= 64 else round(crop * 256 / 224)  # small images: no resize margin
        self.crop, self.path, self.history = crop, run_dir / "knn.jsonl", []

    def __call__(self, backbone, iteration: int) -> float:
        from dinolab.distributed import get_rank
        from dinolab.eval.jobs import run_knn

        res = run_knn(backbone, self.train, self.test, ks=(20,), resize=self.resize, crop=self.crop,
                      progress=False, model_id=f"teacher@{iteration}")
        row = {"iteration": iteration, "knn_top1": res["top1"]["20"], "knn_top5": res["top5"]["20"]}
        self.history.append(row)
        if get_rank() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        log.info("iteration %d: kNN (k=20) top-1 %.2f", iteration, row["knn_top1"])
        return row["knn_top1"]
