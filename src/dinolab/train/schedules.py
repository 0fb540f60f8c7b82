"""Per-iteration schedules as precomputed arrays (the official DINOv2 ``CosineScheduler`` idea).

Every value the training loop changes over time (lr, weight decay, teacher momentum, teacher
temperature, last-layer lr) is one float64 array of length ``total_iters``, indexed by the
global iteration. Arrays are cheap (100 epochs x 1250 iterations = 125k floats), trivially
checkpoint-free (rebuilt from the config on resume) and easy to plot and test.

Defaults are those of the official ``ssl_default_config.yaml`` and ``train.build_schedulers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
    """Freeze, then linear warm-up, then half-cosine; a float64 array of length ``total_iters``.

    The three regimes, in order:
      1. ``freeze_iters`` zeros;
      2. ``warmup_iters`` values from ``start_warmup`` to ``base``, both included (``np.linspace``);
      3. the rest: ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for ``i = 0 .. n-1``,
         so it starts at ``base`` and reaches ``final`` only one step past the end (as in the
         official code, whose ``__getitem__`` returns ``final`` from ``total_iters`` on).
    """
    if min(total_iters, warmup_iters, freeze_iters) < 0:
        raise ValueError(
            f"iteration counts must be >= 0, got {total_iters=}, {warmup_iters=}, {freeze_iters=}"
        )
    n = total_iters - warmup_iters - freeze_iters
    if n < 0:
        raise ValueError(
            f"warm-up ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed total_iters ({total_iters}); "
            "train longer or shorten the warm-up"
        )
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup, base, warmup_iters)
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate((freeze, warmup, cosine))


@dataclass(frozen=True)
class ScheduleValues:
    """The scheduled values for one iteration."""

    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


@dataclass(frozen=True)
class Schedules:
    """All per-iteration schedules of a run; each array has length ``total_iters``."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    @property
    def total_iters(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> ScheduleValues:
        """Values at ``iteration``; past the end, the last value of each array is held."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        i = min(iteration, self.total_iters - 1)
        return ScheduleValues(
            lr=float(self.lr[i]),
            wd=float(self.wd[i]),
            momentum=float(self.momentum[i]),
            teacher_temp=float(self.teacher_temp[i]),
            last_layer_lr=float(self.last_layer_lr[i]),
        )


def build_schedules(
    *,
    total_iters: int,
    iters_per_epoch: int,
    base_lr: float,
    min_lr: float = 1e-6,
    warmup_epochs: int = 10,
    wd: float = 0.04,
    wd_end: float = 0.4,
    momentum: float = 0.992,
    momentum_end: float = 1.0,
    teacher_temp: float = 0.07,
    warmup_teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer_epochs: int = 1,
) -> Schedules:
    """The official DINOv2 schedules.

    ``base_lr`` is the peak lr *after* batch-size scaling (see ``scale_lr``), as ``optim.lr`` in
    the official config. lr: linear warm-up from 0, then cosine to ``min_lr``; weight decay and
    teacher momentum: cosine from start to end value without warm-up; teacher temperature: linear
    warm-up ``warmup_teacher_temp -> teacher_temp``, then constant; last-layer lr: the lr schedule
    with zeros for the first ``freeze_last_layer_epochs`` epochs (overwriting, not shifting, the
    start of the warm-up).
    """
    if iters_per_epoch <= 0 or total_iters <= 0:
        raise ValueError(
            f"need total_iters > 0 and iters_per_epoch > 0, got {total_iters=}, {iters_per_epoch=}"
        )
    lr = cosine_schedule(base_lr, min_lr, total_iters, warmup_iters=warmup_epochs * iters_per_epoch)
    # Official: the temperature schedule is only warm-up long and holds its final value after it;
    # a run shorter than the warm-up stops part way up the ramp.
    temp_warmup = warmup_teacher_temp_epochs * iters_per_epoch
    ramp = np.linspace(warmup_teacher_temp, teacher_temp, temp_warmup)[:total_iters]
    temp = np.full(total_iters, float(teacher_temp))
    temp[: len(ramp)] = ramp
    last_layer_lr = lr.copy()
    last_layer_lr[: freeze_last_layer_epochs * iters_per_epoch] = 0.0
    return Schedules(
        lr=lr,
        wd=cosine_schedule(wd, wd_end, total_iters),
        momentum=cosine_schedule(momentum, momentum_end, total_iters),
        teacher_temp=temp,
        last_layer_lr=last_layer_lr,
    )


def scale_lr(
    base_lr: float,
    batch_size: int,
    rule: Literal["sqrt", "linear", "none"] = "sqrt",
    reference: int = 1024,
) -> float:
    """Scale a learning rate given for ``reference`` images per step to the global ``batch_size``.

    ``"sqrt"`` (official ``sqrt_wrt_1024``): ``base_lr * sqrt(batch_size / reference)``;
    ``"linear"``: ``base_lr * batch_size / reference`` (pass ``reference=256`` for the usual
    ``linear_wrt_256``); ``"none"``: ``base_lr`` unchanged.
    """
    if batch_size <= 0 or reference <= 0:
        raise ValueError(f"batch_size and reference must be > 0, got {batch_size=}, {reference=}")
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / reference)
    if rule == "linear":
        return base_lr * batch_size / reference
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; use 'sqrt', 'linear' or 'none'")
