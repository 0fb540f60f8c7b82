"""AdamW parameter groups with layer-wise lr decay, and applying the schedules to them.

Follows the official DINOv2 rules (``dinov2/utils/param_groups.py``, ``train.apply_optim_scheduler``):

* layer id: 0 for the input side (``patch_embed``, ``cls_token``, ``pos_embed``, ``mask_token``,
  ``register_tokens``), ``i + 1`` for ``blocks.i``, ``depth + 1`` for the rest (final ``norm``,
  heads); ``lr_multiplier = lr_decay_rate ** (depth + 1 - layer_id)``; ``patch_embed`` is further
  multiplied by ``patch_embed_lr_mult``;
* ``wd_multiplier = 0`` for biases, normalisation weights, LayerScale ``gamma`` and tokens;
* ``is_last_layer`` for the DINO/iBOT head's ``last_layer`` (lr from the last-layer schedule,
  which is zero during the first epoch).

Differences from the official code, on purpose: ``register_tokens`` get layer id 0 (official:
``depth + 1``, they are not in its input-side list) and the tokens (``cls_token``, ``pos_embed``,
``mask_token``, ``register_tokens``) get no weight decay (official: they are decayed, since only
names ending ``.bias`` or containing ``norm``/``gamma`` are exempt). Parameters of normalisation
layers are also exempt by module type, not only by name. Pass ``weight_decay_exempt=("*.bias",
"*norm*", "*gamma*")`` for the official weight-decay rule (norm layers, all named ``norm*`` in
our models, stay exempt either way).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

# fnmatch patterns on the parameter name relative to its backbone (or to the model, for heads).
NO_WEIGHT_DECAY: tuple[str, ...] = (
    "*.bias",
    "*norm*",
    "*.gamma",
    "cls_token",
    "pos_embed",
    "mask_token",
    "register_tokens",
)
INPUT_SIDE = ("patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Wrappers applied from outside (torch.compile, FSDP1, activation checkpointing) add these to names.
_WRAPPER_INFIX = re.compile(r"(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def _clean(name: str) -> str:
    return _WRAPPER_INFIX.sub("", name)


def _backbones(model: nn.Module) -> dict[str, int]:
    """Name prefix ("" or "backbone." or "student.backbone." ...) -> depth, for every ViT inside."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and hasattr(module, "patch_embed"):
            prefix = _clean(f"{name}.") if name else ""
            if not any(prefix.startswith(outer) for outer in found):  # skip ViTs nested in a ViT
                found[prefix] = len(blocks)
    return found


def _layer_id(rel_name: str, depth: int) -> int:
    if rel_name.split(".", 1)[0] in INPUT_SIDE:
        return 0
    match = _BLOCK.search(rel_name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(
    model: nn.Module,
    *,
    lr_decay_rate: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    weight_decay_exempt: Sequence[str] = NO_WEIGHT_DECAY,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW``: one group per distinct
    ``(lr_multiplier, wd_multiplier, is_last_layer)``, each with ``params`` and ``param_names``.

    ``model`` is a backbone, or any module holding one (``backbone.``, ``student.backbone.``...)
    plus heads. Backbones are found as submodules with a ``blocks`` ModuleList and a
    ``patch_embed``; the depth is ``len(blocks)``. Parameters outside every backbone (heads) get
    layer id ``depth + 1``, i.e. lr multiplier 1. Frozen parameters (``requires_grad=False``) are
    left out, as in the official code. Names are matched with the wrapper infixes
    ``_orig_mod.``, ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` removed;
    ``param_names`` keep the real names (they go into the optimizer state dict).
    """
    backbones = _backbones(model)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = _clean(name)
        prefix = max((p for p in backbones if clean.startswith(p)), key=len, default=None)
        rel = clean[len(prefix) :] if prefix is not None else clean
        lr_mult = 1.0  # heads: layer id depth + 1 -> rate ** 0
        if prefix is not None:
            depth = backbones[prefix]
            lr_mult = lr_decay_rate ** (depth + 1 - _layer_id(rel, depth))
            if rel.startswith("patch_embed."):
                lr_mult *= patch_embed_lr_mult
        exempt = id(param) in norm_params or any(fnmatch.fnmatchcase(rel, pat) for pat in weight_decay_exempt)
        is_last_layer = "last_layer" in name.split(".")
        key = (lr_mult, 0.0 if exempt else 1.0, is_last_layer)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "param_names": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's ``lr`` and ``weight_decay`` for this iteration (official
    ``apply_optim_scheduler``): ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier``,
    ``weight_decay = wd * wd_multiplier``. Groups without the keys count as multiplier 1."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)


def make_adamw(
    groups: Iterable[dict[str, Any]],
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups``; lr and weight decay start at 0 and come from ``apply_schedules``
    before every step."""
    return torch.optim.AdamW(list(groups), lr=0.0, betas=betas, weight_decay=0.0, fused=fused)
