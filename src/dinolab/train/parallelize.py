"""Data parallelism, compilation and activation checkpointing, applied to a finished ``SSLMetaArch``.

The model code knows nothing of these (torchtitan's ``parallelize_llama`` pattern): ``parallelize``
changes how the student's modules are *called*, never what they are named, except for DDP's
``module.`` which ``unwrap`` removes again.

- **DDP** wraps each student part (``backbone``, ``dino_head``, ``ibot_head``) in
  ``DistributedDataParallel``; the teacher stays a plain module (no gradients, and every rank
  computes the same EMA from the same all-reduced gradients, so teachers stay identical).
  Options, and why: ``find_unused_parameters=False``, ``static_graph=False``. One step calls the
  student backbone twice (masked global crops, then local crops) and the DINO head two or three
  times before a single backward. DDP all-reduces a parameter's gradient from a hook on its
  gradient accumulator, and autograd sums the contributions of all calls into that accumulator
  and runs it once per backward, so each parameter is reduced once with its full gradient; DDP
  never has to look at the outputs, so the ``BackboneOutput`` dataclass needs no wrapping.
  ``find_unused_parameters=True`` would break this: every call re-marks the parameters that its
  own output does not reach as unused (``mask_token`` after the local-crop pass), so their real
  gradient arrives for an already-reduced parameter. It is not needed either: every student
  parameter gets a gradient every step (``mask_token`` enters through ``torch.where`` even with no
  patch masked; the iBOT head runs on a (0, D) tensor when nothing is masked). Should a change
  leave a parameter without gradient, DDP raises an error at the next step.
  ``static_graph=True`` is wrong here too: its first iteration delays the all-reduce to a hook on
  the output tensors, which DDP finds with pytree; a dataclass output is a pytree leaf, so the
  first step's gradients are silently not averaged (both failures reproduce in the test).
- **Compile** and **activation checkpointing** work per backbone block and add no wrapper module
  (so no ``_orig_mod.`` in parameter names). Compile: ``nn.Module.compile`` on every block of
  student and teacher, in place; blocks share one compiled graph per kind of call, per-block
  graphs keep DDP's overlap of communication with the backward, and the data-dependent parts
  (iBOT patch selection, heads on a varying number of masked patches) stay eager. Checkpointing
  (student blocks): the block's ``forward`` becomes a non-reentrant ``torch.utils.checkpoint``
  call of the original, RNG state preserved, so stochastic depth drops the same samples when
  recomputing. With compile the checkpoint is traced into the block's graph: right with the
  ``inductor`` and ``aot_eager`` backends, but the ``eager`` backend replays other drop-path
  masks. Both survive ``copy.deepcopy`` (the copy is uncompiled; its forward is its own).

Example (``torchrun --nproc-per-node 2``)::

    init_distributed()
    arch = build_arch(cfg, reduce=all_reduce_sum)
    optimizer = build_optimizer(cfg, arch)               # plain names in the optimizer state
    arch = parallelize(arch, device=dev, mode="ddp" if is_distributed() else "none")
    save_checkpoint(..., {"model": unwrap(arch).state_dict(), ...})
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from dinolab.errors import DinolabError
from dinolab.train.meta_arch import SSLMetaArch

log = logging.getLogger(__name__)
Mode = Literal["ddp", "none"]


def parallelize(arch: SSLMetaArch, *, device: torch.device | str, mode: Mode = "ddp",
                compile: bool | str = False, activation_checkpointing: bool = False) -> SSLMetaArch:
    """Move ``arch`` to ``device``; compile and checkpoint its blocks; wrap the student in DDP.

    Args:
        arch: a freshly built ``SSLMetaArch`` (not yet parallelized); changed in place and returned.
        device: where the model lives; with DDP on CUDA, this process's GPU.
        mode: ``"ddp"`` (needs an initialised process group, see ``init_distributed``) or ``"none"``.
        compile: True compiles every backbone block with the default backend; a string names the
            ``torch.compile`` backend (``"aot_eager"`` to debug).
        activation_checkpointing: recompute each student block in the backward pass.
    """
    if mode not in ("ddp", "none"):
        raise DinolabError(f"parallelize mode must be 'ddp' or 'none', got {mode!r}")
    blocks = _inner(arch.student["backbone"]).blocks
    if any(_inner(m) is not m for m in arch.student.values()) or {"forward", "_compiled_call_impl"} & vars(blocks[0]).keys():
        raise DinolabError("arch is already parallelized: call parallelize once on a freshly built arch")
    device = torch.device(device)
    arch.to(device)
    if activation_checkpointing:
        for blk in blocks:
            blk.forward = _Checkpointed(blk.forward)
    if compile:
        for part in (arch.student, arch.teacher):
            for blk in _inner(part["backbone"]).blocks:
                blk.compile(backend=compile if isinstance(compile, str) else "inductor")
    if mode == "ddp":
        if not (dist.is_available() and dist.is_initialized()):
            raise DinolabError("parallelize(mode='ddp') needs a process group: call "
                               "dinolab.distributed.init_distributed() first (under torchrun), or use mode='none'")
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        for name, module in list(arch.student.items()):
            # Why these two options: see the module docstring.
            arch.student[name] = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                                         static_graph=False)
    log.info("parallelized: mode=%s compile=%s activation_checkpointing=%s on %s", mode, compile,
             activation_checkpointing, device)
    return arch


class _Checkpointed:
    """``forward`` recomputed in the backward pass; an object (not a closure) so that
    ``copy.deepcopy`` rebinds the bound method to the copied block."""

    def __init__(self, forward: Callable) -> None:
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def _inner(module: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (itself when unwrapped)."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile(module)
            module = module._orig_mod
        else:
            return module


def unwrap(arch: SSLMetaArch) -> SSLMetaArch:
    """``arch`` with the plain student modules: for ``state_dict``, ``load_state_dict`` and export.

    A shallow view sharing every parameter, buffer and submodule with ``arch`` (nothing is copied),
    whose ``state_dict`` keys are those of an arch that was never parallelized, so checkpoints
    move freely between 1 and N processes. ``arch`` itself when nothing is wrapped.
    """
    inner = {name: _inner(m) for name, m in arch.student.items()}
    if all(inner[name] is m for name, m in arch.student.items()):
        return arch
    plain = copy.copy(arch)  # new __dict__, same values: share everything but the module table
    plain.__dict__["_modules"] = dict(arch._modules)
    plain._modules["student"] = nn.ModuleDict(inner)
    return plain
