"""The teacher as an exponential moving average of the student.

``teacher = m * teacher + (1 - m) * student``, applied to *parameters only*, as the official
DINOv2 ``SSLMetaArch.update_teacher``: buffers are not averaged nor copied (the ViT and the DINO
heads have none that train; the centering state lives in the losses). ``torch._foreach_*`` runs
the update as a few fused multi-tensor kernels instead of two kernels per parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update_(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """In place: ``t = momentum * t + (1 - momentum) * s`` for every pair; same order and shapes."""
    if len(teacher_params) != len(student_params):
        raise ValueError(f"{len(teacher_params)} teacher tensors but {len(student_params)} student tensors")
    if not teacher_params:
        return
    teacher = list(teacher_params)
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, list(student_params), alpha=1.0 - momentum)


def ema_update_module_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of every student parameter into the teacher parameter of the same name.

    Raises ``ValueError`` when the names differ (e.g. one side wrapped by DDP or compile: pass
    the inner modules).
    """
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t.keys() != s.keys():
        only_t, only_s = sorted(t.keys() - s.keys())[:5], sorted(s.keys() - t.keys())[:5]
        raise ValueError(
            f"teacher and student parameter names differ (teacher only: {only_t}, student only: {only_s}); "
            "pass unwrapped modules built from the same architecture"
        )
    names = list(t)
    ema_update_([t[n] for n in names], [s[n] for n in names], momentum)
