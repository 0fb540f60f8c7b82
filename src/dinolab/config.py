"""Typed pretraining configuration: dataclass schema, packaged YAML presets, dotted overrides.

The dataclass defaults are the official ``dinov2/configs/ssl_default_config.yaml`` (the base that
every official ``configs/train/*.yaml`` overrides); field names follow it where it has one. Presets
live in ``dinolab/configs/train/<name>.yaml``; a YAML file may say ``base: <preset or path>`` to
start from another file and change a few fields. Overrides are ``section.field=value`` strings whose
value is read as YAML (``optim.base_lr=1e-3``, ``crops.global_scale=[0.4,1.0]``, ``train.epochs=5``).
Unknown keys and wrongly typed values raise ``DinolabError``: a typo never passes silently.

Configs are read only at the edge (CLI, job entry functions); derived values (scaled lr, iterations
per epoch, backbone arguments) come from the pure functions at the bottom, never stored.

Example::

    cfg = load_config("cifar10", ["optim.base_lr=1e-3", "train.epochs=5"])
    save_config(cfg, run_dir / "config.yaml")  # load_config(run_dir / "config.yaml") == cfg
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from dinolab.errors import DinolabError
from dinolab.io import atomic_write_text

Pair = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Student/teacher backbone: a variant name from ``dinolab.models`` plus training-time fields."""

    arch: str = "vit_large_patch16"  # official default: vit_large, patch 16
    drop_path_rate: float = 0.3  # stochastic depth, uniform over blocks (official drop_path_uniform)
    layerscale: float | None = 1.0e-5  # LayerScale init; None: no LayerScale
    img_size: int = 224  # positional-embedding grid size (official: the global crop size)
    num_register_tokens: int | None = None  # None: the variant's own
    depth: int | None = None  # None: the variant's own; smaller for smoke tests
    ffn: Literal["mlp", "swiglu"] | None = None  # None: the variant's own (official "swiglufused" = swiglu)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """DINO head (class token) and iBOT head (patch tokens). ``ibot_*`` None: same as the DINO head."""

    out_dim: int = 65536  # prototypes (official dino.head_n_prototypes)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    separate_ibot_head: bool = False  # official ibot.separate_head
    ibot_out_dim: int | None = None
    ibot_hidden_dim: int | None = None
    ibot_bottleneck_dim: int | None = None
    ibot_nlayers: int | None = None


@dataclass(frozen=True, kw_only=True)
class CropsConfig:
    """Multi-crop views (``dinolab.data.augment.MultiCropAugmentation``); sizes in pixels."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: Pair = (0.32, 1.0)
    local_scale: Pair = (0.05, 0.32)
    blur: Literal["faithful", "intended"] = "faithful"


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """iBOT block masks on the global crops (``dinolab.data.collate.collate_multicrop``)."""

    probability: float = 0.5  # fraction of global crops that get a mask
    ratio: Pair = (0.1, 0.5)  # (min, max) fraction of patches masked in a masked crop


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss weights, teacher-target centering and temperatures (official dino/ibot/teacher fields)."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: Literal["softmax_center", "sinkhorn_knopp"] = "softmax_center"  # official "centering"
    center_momentum: float = 0.9  # softmax_center only
    sinkhorn_iters: int = 3  # sinkhorn_knopp only
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW, its schedules and the EMA teacher momentum."""

    base_lr: float = 0.004  # peak lr for a global batch of 1024 images, before scaling
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_<N> | linear_wrt_<N> | none
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # 0: no clipping
    freeze_last_layer_epochs: int = 1
    betas: Pair = (0.9, 0.999)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Run length, data loading and bookkeeping. ``*_every`` count iterations; 0 turns them off."""

    dataset_path: str = ""  # folder, list file or shards; usually given on the command line
    batch_size_per_gpu: int = 64
    epochs: int = 100
    iters_per_epoch: int = 1250  # official OFFICIAL_EPOCH_LENGTH; 0: one pass over the dataset
    seed: int = 0
    num_workers: int = 10
    output_dir: str = "."
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # official: fp16 + grad scaler
    log_every: int = 10
    checkpoint_every: int = 3750  # official: every 3 epochs of 1250 iterations
    keep_last: int = 3
    eval_every: int = 12500  # official evaluation.eval_period_iterations
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun; auto = ddp (fsdp: ViT-g preset)
    compile: bool = False  # torch.compile every backbone block (student and teacher)
    activation_checkpointing: bool = False  # recompute student blocks in the backward: less memory
    packed_crops: bool = False  # student runs global + local crops in one packed pass (else two passes)


@dataclass(frozen=True, kw_only=True)
class HighResConfig:
    """Optional final phase at high resolution (DINOv2 paper, "adapting the resolution")."""

    iterations: int = 0  # 0: no high-resolution phase
    global_size: int = 518
    local_size: int = 98
    batch_size_per_gpu: int | None = None  # None: train.batch_size_per_gpu


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a pretraining run needs; ``save_config`` writes it into the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)


# ---------------------------------------------------------------- loading


def list_presets() -> list[str]:
    """Names of the packaged training presets (``load_config(name)``)."""
    folder = resources.files("dinolab") / "configs" / "train"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(preset_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Build a validated ``Config`` from a preset name or YAML path, then ``a.b=value`` overrides."""
    raw = _read_chain(str(preset_or_path), relative_to=None, seen=())
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML or JSON."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
    return {sec: {k: plain(v) for k, v in d.items()} for sec, d in dataclasses.asdict(cfg).items()}


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); ``load_config(path)`` gives ``cfg`` back."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    return atomic_write_text(path, "# resolved dinolab pretraining config\n" + text)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, one field a line; short lists inline (``global_scale: [0.32, 1.0]``)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _read_chain(source: str, *, relative_to: Path | None, seen: tuple[str, ...]) -> dict[str, Any]:
    """Read one YAML file (preset or path) with its ``base:`` chain merged underneath."""
    text, label, folder = _open_source(source, relative_to)
    if label in seen:
        raise DinolabError(f"config 'base:' chain loops: {' -> '.join(seen + (label,))}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DinolabError(f"{label} is not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise DinolabError(f"{label} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise DinolabError(f"{label}: 'base' must be a preset name or a path, got {base!r}")
    return _merge(_read_chain(base, relative_to=folder, seen=seen + (label,)), data)


def _open_source(source: str, relative_to: Path | None) -> tuple[str, str, Path | None]:
    """(text, label, folder for relative ``base:`` paths) of a preset name or a YAML path."""
    if source in list_presets():
        text = (resources.files("dinolab") / "configs" / "train" / f"{source}.yaml").read_text()
        return text, f"preset {source!r}", None
    path = Path(source).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise DinolabError(
            f"no preset or file named {source!r}; presets: {', '.join(list_presets())}; "
            "or give the path of a .yaml file"
        )
    return path.read_text(), str(path), path.parent


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Merge one ``a.b=value`` string into the raw dict; the key is checked against the schema."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise DinolabError(f"override {item!r} is not of the form section.field=value (e.g. train.epochs=5)")
    cls: Any = Config
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise DinolabError(f"{'.'.join(parts[:i])!r} is a value, it has no field {part!r}")
        _check_keys(cls, [part], ".".join(parts[:i]))
        cls = get_type_hints(cls)[part]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DinolabError(f"override {item!r}: the value is not valid YAML: {e}") from None
    if value is not None and not isinstance(value, str) and _accepts_str(cls):
        value = text.strip()  # e.g. train.output_dir=2024 stays a string
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DinolabError(f"cannot apply {item!r}: {part!r} in the YAML is not a mapping")
    last = parts[-1]
    merge = isinstance(value, dict) and isinstance(node.get(last), dict)  # e.g. crops={n_local: 4}
    node[last] = _merge(node[last], value) if merge else value


def _check_keys(cls: type, keys: Sequence[str], prefix: str) -> None:
    valid = [f.name for f in fields(cls)]
    for k in keys:
        if k not in valid:
            where = f"under '{prefix}'" if prefix else "at the top level"
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            full = f"{prefix}.{k}" if prefix else str(k)
            raise DinolabError(f"unknown config key '{full}'{hint}; valid keys {where}: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a raw mapping, checking keys and value types."""
    data = {} if data is None else data  # a section whose fields are all commented out
    if not isinstance(data, Mapping):
        raise DinolabError(f"'{prefix or 'config'}' must be a mapping of keys, got {data!r}")
    _check_keys(cls, list(data), prefix)
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = _build(tp, value, key) if is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def _accepts_str(tp: Any) -> bool:
    return tp is str or (get_origin(tp) in (Union, types.UnionType) and any(map(_accepts_str, get_args(tp))))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints widen to floats, lists become tuples."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise DinolabError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        items = value if isinstance(value, (list, tuple)) else [value]  # a single value: a list of one
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise DinolabError(f"{key}: expected a list of {len(args)} numbers, e.g. [0.32, 1.0], got {value!r}")
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except (ValueError, OverflowError):
            number = None
        if number is not None and not math.isfinite(number):  # every float field, in one place
            raise DinolabError(f"{key}: expected a finite number, got {value!r}")
        if number is not None:
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a path or name that YAML read as a number
    elif isinstance(value, tp):  # str, bool
        return value
    raise DinolabError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Raise ``DinolabError`` naming every setting that cannot work (all of them, in one message)."""
    errors = _size_errors(cfg) + _range_errors(cfg)
    if errors:
        raise DinolabError("invalid config: " + "; ".join(errors))


def _size_errors(cfg: Config) -> list[str]:
    """Crop and image sizes against the backbone's patch size and each other."""
    try:
        patch = patch_size(cfg.model)
    except DinolabError as e:
        return [f"model.arch: {e}"]
    c, hr = cfg.crops, cfg.highres
    sizes = {"model.img_size": cfg.model.img_size, "crops.global_size": c.global_size,
             "crops.local_size": c.local_size}
    if hr.iterations:
        sizes |= {"highres.global_size": hr.global_size, "highres.local_size": hr.local_size}
    errors = [f"{name}={size} is not a positive multiple of the patch size {patch} of {cfg.model.arch} "
              f"(try {max(patch, size // patch * patch)})"
              for name, size in sizes.items() if size <= 0 or size % patch]
    if c.local_size > c.global_size:
        errors.append(f"crops.local_size={c.local_size} is larger than crops.global_size={c.global_size}")
    if hr.iterations and hr.local_size > hr.global_size:
        errors.append(f"highres.local_size={hr.local_size} > highres.global_size={hr.global_size}")
    return errors


def _range_errors(cfg: Config) -> list[str]:
    """Every numeric field against the range where it makes sense."""
    m, h, lo, o, t = cfg.model, cfg.head, cfg.loss, cfg.optim, cfg.train
    checks: list[tuple[bool, str]] = [
        (0 <= m.drop_path_rate < 1, f"model.drop_path_rate={m.drop_path_rate} is outside [0, 1)"),
        (m.depth is None or m.depth >= 1, f"model.depth={m.depth} must be >= 1"),
        ((m.num_register_tokens or 0) >= 0, f"model.num_register_tokens={m.num_register_tokens} is < 0"),
        (min(h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers) >= 1, "head sizes must be >= 1"),
        (min(ibot_head_dims(h).values()) >= 1, "head.ibot_* sizes must be >= 1"),
        (cfg.crops.n_local >= 0, f"crops.n_local={cfg.crops.n_local} must be >= 0"),
        (0 <= cfg.mask.probability <= 1, f"mask.probability={cfg.mask.probability} is outside [0, 1]"),
        (min(lo.dino_weight, lo.ibot_weight, lo.koleo_weight) >= 0, "loss.*_weight must be >= 0"),
        (lo.dino_weight + lo.ibot_weight > 0, "loss.dino_weight and loss.ibot_weight are both 0"),
        (min(lo.student_temp, lo.teacher_temp, lo.warmup_teacher_temp) > 0, "loss temperatures must be > 0"),
        (lo.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs must be >= 0"),
        (0 <= lo.center_momentum < 1, f"loss.center_momentum={lo.center_momentum} is outside [0, 1)"),
        (lo.sinkhorn_iters >= 1, f"loss.sinkhorn_iters={lo.sinkhorn_iters} must be >= 1"),
        (o.base_lr > 0 and o.min_lr >= 0, "optim.base_lr must be > 0 and optim.min_lr >= 0"),
        (0 <= o.warmup_epochs <= t.epochs,
         f"optim.warmup_epochs={o.warmup_epochs} is not in [0, train.epochs={t.epochs}]: shorten it"),
        (0 <= o.freeze_last_layer_epochs <= t.epochs,
         f"optim.freeze_last_layer_epochs={o.freeze_last_layer_epochs} not in [0, train.epochs={t.epochs}]"),
        (0 <= o.momentum_teacher <= o.final_momentum_teacher <= 1,
         "need 0 <= optim.momentum_teacher <= optim.final_momentum_teacher <= 1"),
        (0 < o.layerwise_decay <= 1, f"optim.layerwise_decay={o.layerwise_decay} is outside (0, 1]"),
        (min(o.weight_decay, o.weight_decay_end, o.clip_grad, o.patch_embed_lr_mult) >= 0,
         "optim.weight_decay, weight_decay_end, clip_grad and patch_embed_lr_mult must be >= 0"),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)} must lie in [0, 1)"),
        (t.batch_size_per_gpu >= 1, f"train.batch_size_per_gpu={t.batch_size_per_gpu} must be >= 1"),
        (t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1"),
        (t.iters_per_epoch >= 0, f"train.iters_per_epoch={t.iters_per_epoch} must be >= 0 (0: one pass)"),
        (min(t.num_workers, t.checkpoint_every, t.eval_every) >= 0,
         "train.num_workers, checkpoint_every and eval_every must be >= 0"),
        (min(t.log_every, t.keep_last) >= 1, "train.log_every and train.keep_last must be >= 1"),
        (cfg.highres.iterations >= 0, f"highres.iterations={cfg.highres.iterations} must be >= 0"),
        ((cfg.highres.batch_size_per_gpu or 1) >= 1, "highres.batch_size_per_gpu must be >= 1"),
    ]
    for name, (a, b) in (("crops.global_scale", cfg.crops.global_scale),
                         ("crops.local_scale", cfg.crops.local_scale)):
        checks.append((0 < a <= b <= 1, f"{name}=[{a}, {b}] must satisfy 0 < min <= max <= 1"))
    a, b = cfg.mask.ratio
    checks.append((0 <= a <= b <= 1, f"mask.ratio=[{a}, {b}] must satisfy 0 <= min <= max <= 1"))
    for n in ("ibot_out_dim", "ibot_hidden_dim", "ibot_bottleneck_dim", "ibot_nlayers"):
        msg = f"head.{n} is set but the iBOT head shares the DINO head: set head.separate_ibot_head=true"
        checks.append((getattr(h, n) is None or h.separate_ibot_head, msg))
    try:
        lr_scaling(o.scaling_rule)
    except DinolabError as e:
        checks.append((False, str(e)))
    return [msg for ok, msg in checks if not ok]


# ---------------------------------------------------------------- derived values (pure)


def patch_size(model: ModelConfig) -> int:
    """Patch size of ``model.arch`` from the variant table."""
    from dinolab.models.variants import get_variant  # config sits below models in the import order

    try:
        return get_variant(model.arch).patch_size
    except KeyError as e:
        raise DinolabError(str(e.args[0])) from None


def backbone_kwargs(model: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``dinolab.models.DinoVisionTransformer`` for ``model``: the variant's
    own, with this config's image size, depth, registers, FFN, stochastic depth and LayerScale."""
    from dinolab.models.variants import get_variant

    variant = get_variant(model.arch)
    changes: dict[str, Any] = {"img_size": model.img_size}
    if model.depth is not None:
        changes["depth"] = model.depth
    if model.num_register_tokens is not None:
        changes["num_register_tokens"] = model.num_register_tokens
    if model.ffn is not None and model.ffn != variant.ffn:
        mlp_hidden = 4 * variant.embed_dim
        # official SwiGLUFFNFused: 2/3 of the MLP width, rounded up to a multiple of 8
        changes["ffn"] = model.ffn
        changes["ffn_hidden"] = mlp_hidden if model.ffn == "mlp" else (int(mlp_hidden * 2 / 3) + 7) // 8 * 8
    kwargs = get_variant(model.arch, **changes).model_kwargs()
    return kwargs | {"drop_path_rate": model.drop_path_rate, "layerscale": model.layerscale}


def ibot_head_dims(head: HeadConfig) -> dict[str, int]:
    """``out_dim, hidden_dim, bottleneck_dim, nlayers`` of the iBOT head (the DINO head's if shared)."""
    pick = (lambda own, dino: dino if own is None or not head.separate_ibot_head else own)
    return {"out_dim": pick(head.ibot_out_dim, head.out_dim),
            "hidden_dim": pick(head.ibot_hidden_dim, head.hidden_dim),
            "bottleneck_dim": pick(head.ibot_bottleneck_dim, head.bottleneck_dim),
            "nlayers": pick(head.ibot_nlayers, head.nlayers)}


def lr_scaling(rule: str) -> tuple[Literal["sqrt", "linear", "none"], int]:
    """Parse ``sqrt_wrt_1024`` / ``linear_wrt_256`` / ``none`` into ``(rule, reference batch)``."""
    if rule == "none":
        return "none", 1024
    match = re.fullmatch(r"(sqrt|linear)_wrt_([1-9][0-9]*)", rule)
    if not match:
        raise DinolabError(f"optim.scaling_rule={rule!r}; use sqrt_wrt_<N>, linear_wrt_<N> or none")
    return match.group(1), int(match.group(2))  # type: ignore[return-value]


def global_batch_size(cfg: Config, world_size: int = 1) -> int:
    return cfg.train.batch_size_per_gpu * world_size


def scaled_lr(cfg: Config, world_size: int = 1) -> float:
    """Peak lr for this run: ``optim.base_lr`` scaled to the global batch by ``optim.scaling_rule``."""
    rule, reference = lr_scaling(cfg.optim.scaling_rule)
    batch = global_batch_size(cfg, world_size)
    return {"sqrt": cfg.optim.base_lr * math.sqrt(batch / reference),
            "linear": cfg.optim.base_lr * batch / reference, "none": cfg.optim.base_lr}[rule]


def iters_per_epoch(cfg: Config, dataset_size: int, world_size: int = 1) -> int:
    """``train.iters_per_epoch``, or (when 0) the steps of one pass over ``dataset_size`` images."""
    if cfg.train.iters_per_epoch > 0:
        return cfg.train.iters_per_epoch
    return max(1, dataset_size // global_batch_size(cfg, world_size))
