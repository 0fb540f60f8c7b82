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


# Name components that wrappers applied from outside insert: DDP ``module``, ``torch.compile``
# ``_orig_mod``, FSDP1 / checkpoint-wrapper modules. Dropped before pairing teacher and student.
WRAPPER_NAMES = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrapped_name(name: str) -> str:
    """``name`` without wrapper components: ``backbone.module.blocks.0.x`` -> ``backbone.blocks.0.x``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def _by_unwrapped_name(module: nn.Module) -> dict[str, Tensor]:
    params: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        key = unwrapped_name(name)
        if key in params:
            raise ValueError(f"two parameters are named {key!r} once wrapper names are removed")
        params[key] = p
    return params


def ema_update_module_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of every student parameter into the teacher parameter of the same name.

    Names are compared with wrapper components removed (see ``unwrapped_name``), so either side
    may be wrapped by DDP or ``torch.compile``. Raises ``ValueError`` when the names still differ.
    """
    t, s = _by_unwrapped_name(teacher), _by_unwrapped_name(student)
    if t.keys() != s.keys():
        only_t, only_s = sorted(t.keys() - s.keys())[:5], sorted(s.keys() - t.keys())[:5]
        raise ValueError(
            f"teacher and student parameter names differ (teacher only: {only_t}, student only: {only_s}); "
            "pass modules built from the same architecture"
        )
    names = list(t)
    ema_update_([t[n] for n in names], [s[n] for n in names], momentum)
