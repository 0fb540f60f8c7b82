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
- **FSDP2** (``mode="fsdp"``, for ViT-g and anything whose AdamW state does not fit one GPU):
  ``torch.distributed.fsdp.fully_shard`` on every backbone block, then on each backbone and head,
  for the student and the teacher alike, so parameters, gradients, optimizer state and the
  teacher are all sharded; each block is all-gathered just before it runs and freed after.
  Parameters become ``DTensor`` shards under their plain names: the EMA pairs teacher and student
  shards by name and updates them locally (same placements, no communication), the centering
  objects all-reduce as with DDP. The optimizer must be built *after* ``parallelize`` (it has to
  hold the sharded parameters): ``build_optimizer(cfg, arch)`` once sharded. Checkpoints go through
  ``full_state`` / ``load_full_state``, which gather to / scatter from the unsharded layout, so a
  checkpoint written by an FSDP run resumes under DDP or one process and the other way round.
  With ``param_dtype`` (bf16 on GPUs) blocks compute in that dtype and gradients are reduced in fp32.
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
Mode = Literal["ddp", "fsdp", "none"]


def parallelize(arch: SSLMetaArch, *, device: torch.device | str, mode: Mode = "ddp",
                compile: bool | str = False, activation_checkpointing: bool = False,
                param_dtype: torch.dtype | None = None) -> SSLMetaArch:
    """Move ``arch`` to ``device``; compile and checkpoint its blocks; wrap the student in DDP or
    shard student and teacher with FSDP2.

    Args:
        arch: a freshly built ``SSLMetaArch`` (not yet parallelized); changed in place and returned.
        device: where the model lives; with DDP on CUDA, this process's GPU.
        mode: ``"ddp"``, ``"fsdp"`` (both need an initialised process group, see
            ``init_distributed``) or ``"none"``.
        compile: True compiles every backbone block with the default backend; a string names the
            ``torch.compile`` backend (``"aot_eager"`` to debug).
        activation_checkpointing: recompute each student block in the backward pass.
        param_dtype: FSDP only: the dtype blocks compute in (gradients are reduced in fp32).
    """
    if mode not in ("ddp", "fsdp", "none"):
        raise DinolabError(f"parallelize mode must be 'ddp', 'fsdp' or 'none', got {mode!r}")
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
    if mode != "none" and not (dist.is_available() and dist.is_initialized()):
        raise DinolabError(f"parallelize(mode={mode!r}) needs a process group: call "
                           "dinolab.distributed.init_distributed() first (under torchrun), or use mode='none'")
    if mode == "fsdp":
        _shard(arch, param_dtype)
    if mode == "ddp":
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        for name, module in list(arch.student.items()):
            # Why these two options: see the module docstring.
            arch.student[name] = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                                         static_graph=False)
    log.info("parallelized: mode=%s compile=%s activation_checkpointing=%s on %s", mode, compile,
             activation_checkpointing, device)
    return arch


def _shard(arch: SSLMetaArch, param_dtype: torch.dtype | None) -> None:
    """FSDP2: every block, then every backbone and head, of the student and of the teacher."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)} \
        if param_dtype is not None else {}
    for part in (arch.student, arch.teacher):
        for name, module in part.items():
            if name == "backbone":
                for blk in module.blocks:
                    fully_shard(blk, **kw)
            fully_shard(module, **kw)
            if part is arch.teacher:
                # A root FSDP module keeps its own parameters gathered after forward until its
                # backward, which the teacher never runs: reshard at once (the EMA needs shards).
                module.register_forward_hook(lambda m, args, out: m.reshard())


def is_sharded(arch: SSLMetaArch) -> bool:
    """Whether ``arch`` was parallelized with ``mode="fsdp"``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in arch.student.values())


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(arch: SSLMetaArch, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model state dict and optimizer state (keyed by parameter name), on the CPU.

    Under FSDP a collective: every rank must call it; rank 0 gets the full state (gathered to the
    CPU), the other ranks empty dicts. The optimizer state uses parameter names as keys in every
    mode, so checkpoints move between modes.
    """
    if is_sharded(arch):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = get_model_state_dict(arch, options=_full_options(cpu_offload=True))
        optim = None if optimizer is None else get_optimizer_state_dict(
            arch, optimizer, options=_full_options(cpu_offload=True))
        return model, optim
    plain = unwrap(arch)
    return plain.state_dict(), None if optimizer is None else _optimizer_state_by_name(plain, optimizer)


def load_full_state(arch: SSLMetaArch, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Load a ``full_state`` result into ``arch`` (and ``optimizer``), sharded or not."""
    if is_sharded(arch):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(arch, model_state, options=_full_options())
        if optimizer is not None and optimizer_state is not None:
            set_optimizer_state_dict(arch, optimizer, optimizer_state, options=_full_options())
        return
    plain = unwrap(arch)
    plain.load_state_dict(model_state)
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(_optimizer_state_by_index(plain, optimizer, optimizer_state))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {p: n for n, p in model.named_parameters()}
    try:
        return [names[p] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise DinolabError("the optimizer holds a parameter that is not in the model") from None


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameter names instead of indices (the layout of
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``)."""
    names, sd = _param_names(model, optimizer), optimizer.state_dict()
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _optimizer_state_by_index(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of ``_optimizer_state_by_name`` for ``optimizer``; index-keyed state passes through."""
    groups = state["param_groups"]
    if not groups or not groups[0]["params"] or not isinstance(groups[0]["params"][0], str):
        return state
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    missing = [n for g in groups for n in g["params"] if n not in index]
    if missing:
        raise DinolabError(f"checkpoint optimizer state names parameters this model lacks: {missing[:3]}")
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]}


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
