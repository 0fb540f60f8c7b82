"""Depth heads on frozen DINOv2 features and the official checkpoint layout.

The heads follow the DINOv2 paper (Sec. 7.3 / App. C) and the released code (``dinov2/hub/depth``,
``dinov2/eval/depth``). Input: one ``(patch_tokens (B, D, h, w), cls_token (B, D))`` pair per
chosen backbone block, taken *before* the final LayerNorm (``get_intermediate_layers(...,
norm=False)``, the official ``final_norm=False``).

- ``LinearDepthHead`` (``lin1``: the last block; ``lin4``: blocks {3, 6, 9, 12} of ViT-S/B,
  {5, 12, 18, 24} of ViT-L, {10, 20, 30, 40} of ViT-g — the paper's and the hub's choice, not the
  last four): the CLS token is concatenated to every patch token, the tokens are bilinearly
  upsampled x4, a 1x1 convolution gives 256 logits per pixel, and depth = sum_k p_k * bin_k over
  bins ``linspace(min_depth, max_depth, 256)`` with the official ``"linear"`` normalisation
  p = (relu(logit) + 0.1) / sum (AdaBins); ``"softmax"`` and ``"sigmoid"`` are the alternatives.
  There is no BatchNorm: the official ``BNHead`` has it commented out. The 1x1 convolution runs
  before the upsampling (the two commute exactly, 16x fewer FLOPs).
- ``DPTDepthHead``: DPT (Ranftl et al. 2021) as in the hub: reassemble 4 blocks (readout
  ``"project"``: Linear(2D, D) + GELU on [token, CLS]; 1x1 conv to [D/8, D/4, D/2, D] channels;
  resize x4, x2, x1, x0.5), 3x3 convs to 256 channels, 4 fusion blocks (pre-activation residual
  units, x2 bilinear upsampling), a 3x3 conv + ReLU, and the depth head (conv, x2, conv, ReLU,
  conv); depth = relu(out) + min_depth.

At inference the depth is clamped to [min_depth, max_depth] (``DepthEncoderDecoder.encode_decode``).
The losses (``SigLoss``, ``GradientLoss``) live in ``dinolab.losses.depth``.

Parameter names are the official ``decode_head.*`` keys without the prefix, so the released
``dinov2_vit*14_{nyu,kitti}_{linear,linear4,dpt}_head.pth`` files load without a rename table, and
heads trained here are saved in that same mmcv layout (plus their settings in ``meta``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.errors import DinolabError
from dinolab.eval.depth_official import (  # noqa: F401  (re-exported: the official names live there)
    OFFICIAL_MAX_DEPTH,
    OfficialHeadName,
    parse_official_name,
    resolve_official_head,
)
from dinolab.io import atomic_write
from dinolab.models.safe_load import safe_torch_load

log = logging.getLogger(__name__)

Features = Sequence[tuple[Tensor, Tensor]]  # per block: (patch tokens (B, D, h, w), CLS token (B, D))

BIN_SPACINGS = ("uniform", "log")
NORM_STRATEGIES = ("linear", "softmax", "sigmoid")
HEAD_NAMES = ("lin1", "lin4", "dpt")
# the hub's block indices for linear4 and DPT, by backbone depth (ViT-S/B 12, ViT-L 24, ViT-g 40)
OFFICIAL_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


class DepthHeadError(DinolabError, ValueError):
    """A head that cannot be built or loaded as asked; the message says what to change."""


# ------------------------------------------------------------------------------------- bins


def depth_bins(min_depth: float, max_depth: float, n_bins: int = 256, spacing: str = "uniform") -> Tensor:
    """The (n_bins,) depth values the classification heads mix, in metres.

    ``"uniform"``: ``linspace(min_depth, max_depth, n)`` (the official ``"UD"``; both ends included).
    ``"log"``: ``exp(linspace(log min, log max, n))``, uniform in log depth. (The official ``"SID"``
    calls ``torch.logspace(min, max)``, i.e. 10^min..10^max, which is not a depth range; no released
    head uses it.)
    """
    if n_bins < 2:
        raise DepthHeadError(f"n_bins must be >= 2, got {n_bins}")
    if spacing == "uniform":
        if not 0.0 <= min_depth < max_depth:
            raise DepthHeadError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        return torch.linspace(min_depth, max_depth, n_bins)
    if spacing == "log":
        if not 0.0 < min_depth < max_depth:
            raise DepthHeadError(f"log bins need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        return torch.exp(torch.linspace(math.log(min_depth), math.log(max_depth), n_bins))
    raise DepthHeadError(f"bin spacing must be one of {BIN_SPACINGS}, got {spacing!r}")


def bins_to_depth(logits: Tensor, bins: Tensor, norm_strategy: str = "linear") -> Tensor:
    """Per-pixel weights over the bins -> depth: (B, K, H, W) logits, (K,) bins -> (B, 1, H, W)."""
    if norm_strategy == "linear":
        p = torch.relu(logits) + 0.1
        p = p / p.sum(dim=1, keepdim=True)
    elif norm_strategy == "softmax":
        p = torch.softmax(logits, dim=1)
    elif norm_strategy == "sigmoid":
        p = torch.sigmoid(logits)
        p = p / p.sum(dim=1, keepdim=True)
    else:
        raise DepthHeadError(f"norm_strategy must be one of {NORM_STRATEGIES}, got {norm_strategy!r}")
    return torch.einsum("bkhw,k->bhw", p, bins.to(p)).unsqueeze(1)


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class DepthHeadConfig:
    """Everything needed to rebuild a head (stored in its checkpoint's ``meta``).

    Attributes:
        kind: ``"linear"`` or ``"dpt"``.
        embed_dim: backbone width D.
        layers: backbone block indices whose outputs the head reads (0-based).
        min_depth, max_depth: output range in metres.
        n_bins, bins, norm_strategy, upsample, use_cls: linear head (see ``LinearDepthHead``).
        channels, readout, post_process_channels: DPT head (empty = the official [D/8, D/4, D/2, D]).
        final_norm: pass the tokens through the backbone's final LayerNorm (official: False).
    """

    kind: str
    embed_dim: int
    layers: tuple[int, ...]
    min_depth: float = 1e-3
    max_depth: float = 10.0
    n_bins: int = 256
    bins: str = "uniform"
    norm_strategy: str = "linear"
    upsample: int = 4
    use_cls: bool = True
    channels: int = 256
    readout: str = "project"
    post_process_channels: tuple[int, ...] = field(default=())
    final_norm: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DepthHeadConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise DepthHeadError(f"unknown depth-head settings {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def head_layers(name: str, depth: int) -> tuple[int, ...]:
    """Block indices for ``lin1`` (the last block) or ``lin4``/``dpt`` (the hub's four for depth 12,
    24, 40; otherwise the blocks at 1/4, 2/4, 3/4 and 4/4 of the depth)."""
    if name == "lin1":
        return (depth - 1,)
    if name not in HEAD_NAMES:
        raise DepthHeadError(f"head must be one of {HEAD_NAMES}, got {name!r}")
    if depth < 4:
        raise DepthHeadError(f"{name} reads 4 blocks but the backbone has {depth}; use lin1 or a deeper model")
    return OFFICIAL_LAYERS.get(depth, tuple(round((k + 1) * depth / 4) - 1 for k in range(4)))


def make_head_config(name: str, embed_dim: int, depth: int, **settings: Any) -> DepthHeadConfig:
    """Config of a ``lin1`` / ``lin4`` / ``dpt`` head for a backbone of width ``embed_dim`` and ``depth`` blocks."""
    kind = "dpt" if name == "dpt" else "linear"
    return DepthHeadConfig(kind=kind, embed_dim=embed_dim, layers=head_layers(name, depth), **settings)


def build_head(cfg: DepthHeadConfig) -> nn.Module:
    """A freshly initialised head for ``cfg``."""
    if cfg.kind == "linear":
        return LinearDepthHead(cfg.embed_dim, len(cfg.layers), n_bins=cfg.n_bins, min_depth=cfg.min_depth,
                               max_depth=cfg.max_depth, bins=cfg.bins, norm_strategy=cfg.norm_strategy,
                               upsample=cfg.upsample, use_cls=cfg.use_cls)
    if cfg.kind == "dpt":
        if len(cfg.layers) != 4:
            raise DepthHeadError(f"the DPT head reads exactly 4 blocks, got layers {cfg.layers}")
        return DPTDepthHead(cfg.embed_dim, channels=cfg.channels, readout=cfg.readout, min_depth=cfg.min_depth,
                            post_process_channels=cfg.post_process_channels or None)
    raise DepthHeadError(f"head kind must be 'linear' or 'dpt', got {cfg.kind!r}")


# -------------------------------------------------------------------------------- linear head


class LinearDepthHead(nn.Module):
    """Depth as a classification over bins, from frozen tokens (official ``BNHead``, ``classify=True``).

    Args:
        embed_dim: backbone width D.
        n_layers: how many blocks are concatenated (1 = ``lin1``, 4 = ``lin4``).
        n_bins, min_depth, max_depth, bins: the depth bins (see :func:`depth_bins`).
        norm_strategy: ``"linear"`` (official), ``"softmax"`` or ``"sigmoid"``.
        upsample: bilinear upsampling factor of the token grid (official: 4).
        use_cls: concatenate the CLS token to every patch token (official: True).

    ``forward(feats)`` -> (B, 1, upsample * h, upsample * w) depth in metres (not yet clamped).
    """

    def __init__(self, embed_dim: int, n_layers: int = 1, *, n_bins: int = 256, min_depth: float = 1e-3,
                 max_depth: float = 10.0, bins: str = "uniform", norm_strategy: str = "linear", upsample: int = 4,
                 use_cls: bool = True) -> None:
        super().__init__()
        if norm_strategy not in NORM_STRATEGIES:
            raise DepthHeadError(f"norm_strategy must be one of {NORM_STRATEGIES}, got {norm_strategy!r}")
        self.n_layers, self.upsample, self.use_cls = n_layers, upsample, use_cls
        self.norm_strategy = norm_strategy
        self.channels = embed_dim * n_layers * (2 if use_cls else 1)
        self.conv_depth = nn.Conv2d(self.channels, n_bins, kernel_size=1)  # official key: conv_depth
        self.register_buffer("bins", depth_bins(min_depth, max_depth, n_bins, bins), persistent=False)

    def tokens(self, feats: Features) -> Tensor:
        """(B, C, h, w): per block [patch tokens, CLS broadcast to every patch], blocks in order."""
        if len(feats) != self.n_layers:
            raise DepthHeadError(f"the head reads {self.n_layers} blocks, got {len(feats)}")
        parts = []
        for patches, cls in feats:
            parts.append(patches)
            if self.use_cls:
                parts.append(cls[:, :, None, None].expand_as(patches))
        return torch.cat(parts, dim=1)

    def forward(self, feats: Features) -> Tensor:
        x = self.tokens(feats)  # (B, C, h, w)
        logits = self.conv_depth(x)  # (B, K, h, w); a 1x1 conv commutes with bilinear resizing
        h, w = x.shape[-2:]
        logits = F.interpolate(logits, size=(h * self.upsample, w * self.upsample), mode="bilinear",
                               align_corners=False)  # (B, K, 4h, 4w)
        return bins_to_depth(logits, self.bins, self.norm_strategy)


# ----------------------------------------------------------------------------------- DPT head


class _ConvModule(nn.Module):
    """mmcv ``ConvModule`` without norm: ``conv`` (+ ReLU after), or ReLU first (``preact``).
    Kept as a module so the parameters are named ``<name>.conv.*`` like the official keys."""

    def __init__(self, cin: int, cout: int, k: int, *, padding: int = 0, bias: bool = True, act: bool = False,
                 preact: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=bias)
        self.act, self.preact = act, preact

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            x = torch.relu(x)
        x = self.conv(x)
        return torch.relu(x) if self.act else x


class _ResidualUnit(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x)))), 3x3 convs without bias."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = _ConvModule(c, c, 3, padding=1, bias=False, preact=True)
        self.conv2 = _ConvModule(c, c, 3, padding=1, bias=False, preact=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class _FusionBlock(nn.Module):
    """x (+ unit1(skip), resized to x) -> unit2 -> x2 bilinear (align_corners) -> 1x1 conv."""

    def __init__(self, c: int, first: bool) -> None:
        super().__init__()
        self.res_conv_unit1 = None if first else _ResidualUnit(c)
        self.res_conv_unit2 = _ResidualUnit(c)
        self.project = _ConvModule(c, c, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class _Reassemble(nn.Module):
    """Tokens of 4 blocks -> feature maps at 4x, 2x, 1x, 1/2x the token grid (official ``ReassembleBlocks``)."""

    def __init__(self, dim: int, out: Sequence[int], readout: str) -> None:
        super().__init__()
        if readout not in ("ignore", "add", "project"):
            raise DepthHeadError(f"readout must be 'ignore', 'add' or 'project', got {readout!r}")
        self.readout = readout
        self.projects = nn.ModuleList(_ConvModule(dim, c, 1) for c in out)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out[0], out[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out[1], out[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out[3], out[3], kernel_size=3, stride=2, padding=1),
        ])
        if readout == "project":
            self.readout_projects = nn.ModuleList(nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) for _ in out)

    def forward(self, feats: Features) -> list[Tensor]:
        out = []
        for i, (x, cls) in enumerate(feats):
            if self.readout == "project":
                B, D, h, w = x.shape
                tokens = x.flatten(2).transpose(1, 2)  # (B, hw, D)
                tokens = self.readout_projects[i](torch.cat([tokens, cls[:, None].expand_as(tokens)], dim=-1))
                x = tokens.transpose(1, 2).reshape(B, D, h, w)
            elif self.readout == "add":
                x = x + cls[:, :, None, None]
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class _DepthOut(nn.Module):
    """conv3x3 C->C/2, x2 bilinear (align_corners), conv3x3 -> 32, ReLU, conv1x1 -> 1 (official ``HeadDepth``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class DPTDepthHead(nn.Module):
    """DPT decoder on 4 frozen blocks, as the DINOv2 hub builds it (``DPTHead``, regression).

    Args:
        embed_dim: backbone width D.
        channels: fusion width (official 256).
        readout: how the CLS token enters: ``"project"`` (official), ``"add"`` or ``"ignore"``.
        min_depth: added to the ReLU output.
        post_process_channels: reassembled widths (default [D/8, D/4, D/2, D]).

    ``forward(feats)`` (4 blocks) -> (B, 1, 16 * 2 ceil(h/2), 16 * 2 ceil(w/2)) depth in metres.
    """

    def __init__(self, embed_dim: int, *, channels: int = 256, readout: str = "project", min_depth: float = 1e-3,
                 post_process_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        out = list(post_process_channels or [embed_dim // 2 ** (3 - i) for i in range(4)])
        if len(out) != 4:
            raise DepthHeadError(f"post_process_channels needs 4 widths, got {out}")
        self.min_depth = min_depth
        self.reassemble_blocks = _Reassemble(embed_dim, out, readout)
        self.convs = nn.ModuleList(_ConvModule(c, channels, 3, padding=1, bias=False) for c in out)
        self.fusion_blocks = nn.ModuleList(_FusionBlock(channels, first=i == 0) for i in range(4))
        self.project = _ConvModule(channels, channels, 3, padding=1, act=True)
        self.conv_depth = _DepthOut(channels)

    def forward(self, feats: Features) -> Tensor:
        if len(feats) != 4:
            raise DepthHeadError(f"the DPT head reads 4 blocks, got {len(feats)}")
        maps = [conv(m) for conv, m in zip(self.convs, self.reassemble_blocks(feats))]  # 4x, 2x, 1x, 1/2x
        out = self.fusion_blocks[0](maps[3])
        for block, skip in zip(self.fusion_blocks[1:], maps[2::-1]):
            out = block(out, skip)
        return torch.relu(self.conv_depth(self.project(out))) + self.min_depth


# ------------------------------------------------------------------ official checkpoints


def split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(head parameters without the ``decode_head.`` prefix, meta) of an mmcv-style checkpoint."""
    if not isinstance(obj, dict):
        raise DepthHeadError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    sd = obj.get("state_dict", obj)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    prefix = "decode_head."
    head = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    if not head:
        raise DepthHeadError(f"{path} has no decode_head.* tensors: not a DINOv2 depth-head checkpoint "
                             "(expected {'state_dict': {'decode_head.conv_depth.weight': ...}})")
    other = [k for k in sd if not k.startswith("decode_head.")]
    if other:
        log.info("%s: ignoring %d tensors outside decode_head (e.g. %s)", path, len(other), other[0])
    return head, meta


def infer_head_config(sd: dict[str, Tensor], *, embed_dim: int, depth: int, max_depth: float,
                      min_depth: float = 1e-3) -> DepthHeadConfig:
    """Config of an official head from its tensor shapes and the backbone's width and depth."""
    if "conv_depth.weight" in sd and sd["conv_depth.weight"].ndim == 4:
        n_bins, channels = sd["conv_depth.weight"].shape[:2]
        n_layers, rest = divmod(channels, 2 * embed_dim)
        if rest or n_layers not in (1, 4):
            raise DepthHeadError(f"a linear head with {channels} input channels does not fit a backbone of width "
                                 f"{embed_dim} (expected {2 * embed_dim} or {8 * embed_dim}): wrong --model?")
        return make_head_config("lin1" if n_layers == 1 else "lin4", embed_dim, depth, n_bins=n_bins,
                                min_depth=min_depth, max_depth=max_depth)
    if "reassemble_blocks.projects.0.conv.weight" in sd:
        dim = sd["reassemble_blocks.projects.0.conv.weight"].shape[1]
        if dim != embed_dim:
            raise DepthHeadError(f"this DPT head reads {dim}-dim tokens but the backbone has width {embed_dim}: "
                                 "wrong --model?")
        readout = "project" if "reassemble_blocks.readout_projects.0.0.weight" in sd else "ignore"
        widths = tuple(sd[f"reassemble_blocks.projects.{i}.conv.weight"].shape[0] for i in range(4))
        return make_head_config("dpt", embed_dim, depth, min_depth=min_depth, max_depth=max_depth,
                                channels=sd["convs.0.conv.weight"].shape[0], readout=readout,
                                post_process_channels=widths)
    raise DepthHeadError(f"unrecognised depth-head layout (keys {sorted(sd)[:4]}...): expected a linear "
                         "(conv_depth.weight) or DPT (reassemble_blocks.*) head")


@dataclass
class LoadedHead:
    """A head ready to run: the module (eval mode), its config, the checkpoint meta, and the
    backbone it was made for (an official name, or the ``model`` recorded at training; may be None)."""

    head: nn.Module
    config: DepthHeadConfig
    meta: dict[str, Any]
    backbone: str | None


def load_depth_head(source: str | os.PathLike, *, embed_dim: int | None = None, depth: int | None = None,
                    min_depth: float | None = None, max_depth: float | None = None,
                    sha256: str | None = None) -> LoadedHead:
    """Load a head saved by ``dinolab depth train`` or released by Meta.

    ``source``: a ``.pth`` path, or an official name such as ``dinov2_vits14_nyu_linear4`` /
    ``dinov2_vitl14_kitti_dpt`` (file from the cache, or downloaded once). Heads trained here carry
    their config; official files do not, so the width/depth come from the name (or ``embed_dim`` and
    ``depth``, the backbone's) and the range from the name (NYU 10 m, KITTI 80 m) unless given.
    Every parameter must be present with its shape (strict); extra ``decode_head`` tensors are an error.
    """
    official = parse_official_name(source)
    path = Path(source)
    if not path.is_file():
        if official is None:
            raise DepthHeadError(f"depth head {source} is neither a file nor an official name like "
                                 "dinov2_vits14_nyu_linear4 (linear, linear4, dpt; nyu, kitti)")
        path = resolve_official_head(official, sha256=sha256)
    sd, meta = split_checkpoint(safe_torch_load(path, error=DepthHeadError), path)
    stored = meta.get("dinolab_head")
    if stored is not None:
        cfg = DepthHeadConfig.from_dict(stored)
        if min_depth is not None or max_depth is not None:
            cfg = _with_range(cfg, min_depth, max_depth)
        backbone = meta.get("model")
    else:
        if official is not None:
            depth = depth or official.depth
            embed_dim = embed_dim or {"s": 384, "b": 768, "l": 1024, "g": 1536}[official.backbone[len("dinov2_vit")]]
        if embed_dim is None or depth is None:
            raise DepthHeadError(f"{path} has no stored settings: pass the backbone (--model) so its width and "
                                 "depth are known, or name the file like dinov2_vits14_nyu_linear4_head.pth")
        default_max = OFFICIAL_MAX_DEPTH[official.dataset] if official else 10.0
        cfg = infer_head_config(sd, embed_dim=embed_dim, depth=depth, max_depth=max_depth or default_max,
                                min_depth=1e-3 if min_depth is None else min_depth)
        backbone = official.backbone if official else None
    head = build_head(cfg)
    _load_strict(head, sd, path)
    return LoadedHead(head.eval(), cfg, meta, backbone)


def _with_range(cfg: DepthHeadConfig, min_depth: float | None, max_depth: float | None) -> DepthHeadConfig:
    d = cfg.to_dict()
    d["min_depth"] = cfg.min_depth if min_depth is None else min_depth
    d["max_depth"] = cfg.max_depth if max_depth is None else max_depth
    return DepthHeadConfig.from_dict(d)


def _load_strict(head: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    own = head.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or wrong:
        raise DepthHeadError(f"{path} does not fit the head it describes: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}, shape mismatch {wrong[:2]}")
    head.load_state_dict(sd, strict=True)


def save_depth_head(head: nn.Module, cfg: DepthHeadConfig, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``{"state_dict": {"decode_head.*": ...}, "meta": {"dinolab_head": cfg, ...}}`` atomically:
    the official layout (the official code loads it too) plus the settings needed to rebuild it."""
    sd = {f"decode_head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
    obj = {"state_dict": sd, "meta": {"dinolab_head": cfg.to_dict(), **meta}}
    return atomic_write(path, lambda f: torch.save(obj, f))
