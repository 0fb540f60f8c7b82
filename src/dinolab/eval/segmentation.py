"""Semantic segmentation on frozen patch features: the DINOv2 paper's linear heads, test-time
augmentation, sliding windows, and the official segmentation heads of the release.

The model, as in the official evaluation (``dinov2/eval/segmentation``, mmseg ``BNHead``):

1. pad the image to a multiple of the patch size, half on each side (the official demo's
   ``CenterPadding``);
2. ``backbone.get_intermediate_layers(x, n, reshape=True)``: the final-normed patch tokens of the last
   ``n`` blocks as (B, D, h, w) maps, no CLS token (``linear``: n = 1; ``linear4``, the ``+ms`` head:
   n = 4, concatenated to (B, 4D, h, w));
3. ``BatchNorm2d`` over the channels, then a 1x1 conv to class logits (B, K, h, w);
4. bilinear upsampling (align_corners=False) of the logits to the *unpadded* input size — so for a size
   that is not a patch multiple the padded border is squeezed into the image, exactly what the
   official demo does (at most half a patch per side); sizes that are multiples are exact.

Inference (``segment``): ``whole`` image or ``slide`` (overlapping crop x crop windows at ``stride``;
window logits are averaged where windows overlap, mmseg's ``slide_inference``); test-time
augmentation over ``scales`` (ratios of the input size) and horizontal ``flip``: per view, logits are
resized to the output size, turned into probabilities and averaged (mmseg ``aug_test``).
The official ``+ms`` setting: ratios ``MS_SCALES`` = (1.0, 1.32, 1.73, 2.28, 3.0) of a 640-px short
side, with flips.

Checkpoints use mmseg's layout (what the release's ``*_head.pth`` files hold)::

    {"state_dict": {"decode_head.bn.{weight,bias,running_mean,running_var,num_batches_tracked}",
                    "decode_head.conv_seg.{weight (K, C, 1, 1), bias (K,)}"},
     "meta": {"CLASSES": [...], "PALETTE": [[r, g, b], ...], "dinolab": {our settings}}}

so ``read_seg_head`` reads the official files and our own alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.data.segmentation import VOC_CLASSES, SegmentationError, voc_palette
from dinolab.errors import DinolabError, WeightsNotFoundError
from dinolab.io import atomic_write
from dinolab.models.checkpoints import OFFICIAL_BASE_URL, cache_dir, download_weights, verify_file
from dinolab.models.safe_load import safe_torch_load
from dinolab.viz.overlay import distinct_palette

log = logging.getLogger(__name__)

HEAD_LAYERS = {"linear": 1, "linear4": 4}  # head kind -> number of last blocks whose patch tokens it reads
MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)  # official "+ms" test ratios (dinov2 *_ms_config.py)
PREFIX = "decode_head."


# ------------------------------------------------------------------------------------------ heads


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv over concatenated patch-feature maps: mmseg's ``BNHead`` as DINOv2 uses it.

    Args:
        in_channels: channels of the concatenated maps (n_layers x embed_dim).
        num_classes: K output classes.
        n_layers: how many maps ``forward`` expects (1 for ``linear``, 4 for ``linear4``/``ms``).
        dropout: ``Dropout2d`` before the conv (0 in every DINOv2 config).
    """

    def __init__(self, in_channels: int, num_classes: int, n_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels % n_layers:
            raise DinolabError(f"in_channels {in_channels} is not a multiple of n_layers {n_layers}")
        self.n_layers = n_layers
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's init of conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    @property
    def num_classes(self) -> int:
        return self.conv_seg.out_channels

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """``n_layers`` maps (B, D, h, w) -> logits (B, K, h, w) at the first map's resolution."""
        if len(feats) != self.n_layers:
            raise DinolabError(f"head expects {self.n_layers} feature maps, got {len(feats)}")
        size = feats[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else
                       F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)
        return self.conv_seg(self.dropout(self.bn(x)))  # (B, K, h, w)


class RawPixelBackbone(nn.Module):
    """Raw pixels as "patch features": each p x p patch of the (normalised) input flattened to a
    3p^2-dim vector. The floor every backbone must beat; it has the backbone's dense interface."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = in_chans * patch_size * patch_size

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """The same pixel map for each of the ``n`` requested "layers": (B, 3p^2, h, w) with ``reshape``,
        else (B, h*w, 3p^2); the "class token" is the mean patch vector."""
        p = self.patch_size
        B, _, H, W = x.shape
        if H % p or W % p:
            raise DinolabError(f"input {H}x{W} is not a multiple of the patch size {p}")
        cols = F.unfold(x, kernel_size=p, stride=p)  # (B, 3p^2, h*w)
        maps = cols.reshape(B, -1, H // p, W // p) if reshape else cols.transpose(1, 2)
        count = n if isinstance(n, int) else len(n)
        if return_class_token:
            return tuple((maps, cols.mean(dim=-1)) for _ in range(count))
        return tuple(maps for _ in range(count))


def center_pad(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the last two dims up to multiples of ``multiple``, half before and half after (the
    extra pixel of an odd pad after), as the official demo's ``CenterPadding``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Segmenter(nn.Module):
    """A frozen backbone and a trainable linear head; ``forward`` gives logits at the input size.

    The backbone only needs ``patch_size`` and ``get_intermediate_layers(x, n, reshape=True)`` (our
    ViT, ``RawPixelBackbone``). It is kept in eval mode and never receives gradients.
    ``autocast``: dtype for the backbone (bf16 on GPU), None for fp32.
    """

    def __init__(self, backbone: nn.Module, head: LinearSegHead, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        depth = len(getattr(backbone, "blocks", ())) or head.n_layers  # RawPixelBackbone: any number of "layers"
        if depth < head.n_layers:
            raise SegmentationError(f"the head reads the last {head.n_layers} blocks but the backbone has {depth}: "
                                    "use the 'linear' head (last block) or a deeper backbone")
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head
        self.patch_size = int(backbone.patch_size)
        self.autocast = autocast

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm-free, but dropout/drop-path must stay off
        return self

    def features(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> ``head.n_layers`` float32 maps (B, D, h, w) of the centre-padded input."""
        x = center_pad(x, self.patch_size)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            maps = self.backbone.get_intermediate_layers(x, n=self.head.n_layers, reshape=True)
        return [m.float() for m in maps]

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, K, H, W)."""
        logits = self.head(self.features(x))  # (B, K, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# -------------------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Inference:
    """How to run a ``Segmenter`` over an image.

    Attributes:
        mode: ``"whole"`` (one pass) or ``"slide"`` (crop x crop windows every ``stride`` px).
        crop, stride: window side and step in px (``slide`` only).
        scales: test-time ratios of the input size (``MS_SCALES`` for the official ``+ms``).
        flip: also run the horizontally flipped image and flip its prediction back.
    """

    mode: str = "whole"
    crop: int | None = None
    stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise SegmentationError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.mode == "slide" and not (self.crop and self.stride and 0 < self.stride <= self.crop):
            raise SegmentationError(f"slide inference needs crop > 0 and 0 < stride <= crop, got crop={self.crop}, "
                                    f"stride={self.stride} (e.g. --crop 518 --stride 341)")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise SegmentationError(f"scales must be positive ratios, got {self.scales}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def as_dict(self) -> dict:
        return {**asdict(self), "scales": list(self.scales)}


def slide_logits(segmenter: nn.Module, x: Tensor, crop: int, stride: int) -> Tensor:
    """Logits (B, K, H, W) averaged over overlapping crop x crop windows placed every ``stride`` px.

    Windows start at 0, stride, 2 stride, ...; the last one is shifted back to end at the image
    border, so every pixel is covered; an image smaller than ``crop`` is one window.
    """
    B, _, H, W = x.shape
    total: Tensor | None = None
    count = x.new_zeros(1, 1, H, W)
    for y0 in _window_starts(H, crop, stride):
        for x0 in _window_starts(W, crop, stride):
            y1, x1 = min(y0 + crop, H), min(x0 + crop, W)
            out = segmenter(x[..., y0:y1, x0:x1])  # (B, K, y1 - y0, x1 - x0)
            if total is None:
                total = x.new_zeros(B, out.shape[1], H, W)
            total[..., y0:y1, x0:x1] += out
            count[..., y0:y1, x0:x1] += 1
    return total / count


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - crop), 0) for i in range(n)]


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(h, w) times ``scale``, rounded half up (mmcv's rescale)."""
    return int(h * scale + 0.5), int(w * scale + 0.5)


def segment(segmenter: nn.Module, x: Tensor, inference: Inference = Inference(),
            out_size: tuple[int, int] | None = None) -> Tensor:
    """Class probabilities (B, K, *out_size) averaged over the test-time views.

    Each view (scale s, flip f) resizes ``x`` (bilinear) to s times its size, runs ``whole`` or
    ``slide``, un-flips the logits, resizes them (bilinear) to ``out_size`` (default: ``x``'s size) and
    takes the softmax; the result is the mean over views.
    """
    H, W = x.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (H, W)
    probs, views = None, 0
    for s in inference.scales:
        xs = x if s == 1.0 else F.interpolate(x, size=scaled_size(H, W, s), mode="bilinear", align_corners=False)
        for flip in (False, True) if inference.flip else (False,):
            xi = xs.flip(-1) if flip else xs
            logits = (slide_logits(segmenter, xi, inference.crop, inference.stride) if inference.mode == "slide"
                      else segmenter(xi))
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
            views += 1
    return probs / views


# ------------------------------------------------------------------------------- official heads


@dataclass(frozen=True)
class OfficialHead:
    """One segmentation head of the DINOv2 release and the settings its configuration evaluates with."""

    backbone: str  # dinov2_vits14 ...
    dataset: str  # ade20k | voc2012
    kind: str  # linear | ms
    num_classes: int
    n_layers: int
    short_side: int
    inference: Inference

    @property
    def name(self) -> str:
        return f"{self.backbone}_{self.dataset}_{self.kind}"

    @property
    def filename(self) -> str:
        return f"{self.name}_head.pth"

    @property
    def url(self) -> str:
        return f"{OFFICIAL_BASE_URL}/{self.backbone}/{self.filename}"


def _official_heads() -> list[OfficialHead]:
    # linear: ADE20K config read from the release (short side 512, slide 512/341, one scale);
    # ms: 4 layers, ratios MS_SCALES of a 640-px short side with flips (release config and demo);
    # the ms sliding window (640/426) and the VOC settings follow the same pattern (mmseg defaults).
    linear = Inference(mode="slide", crop=512, stride=341)
    ms = Inference(mode="slide", crop=640, stride=426, scales=MS_SCALES, flip=True)
    return [OfficialHead(f"dinov2_vit{s}14", ds, kind, k, 1 if kind == "linear" else 4,
                         512 if kind == "linear" else 640, linear if kind == "linear" else ms)
            for s in "sblg" for ds, k in (("ade20k", 150), ("voc2012", 21)) for kind in ("linear", "ms")]


OFFICIAL_HEADS: dict[str, OfficialHead] = {h.name: h for h in _official_heads()}


def resolve_official_head(head: OfficialHead, *, sha256: str | None = None, download: bool = True,
                          progress: bool = True) -> Path:
    """Path of an official head file: the dinolab cache, torch.hub's cache (where the official demo's
    mmcv loader puts it), or downloaded once (``DINOLAB_WEIGHTS_MIRROR``, ``DINOLAB_OFFLINE`` apply)."""
    dest = cache_dir() / head.filename
    for path in (dest, Path(torch.hub.get_dir()) / "checkpoints" / head.filename):
        if path.is_file():
            verify_file(path, sha256)
            return path
    mirror = os.environ.get("DINOLAB_WEIGHTS_MIRROR")
    url = head.url.replace(OFFICIAL_BASE_URL, mirror.rstrip("/")) if mirror else head.url
    if download and not os.environ.get("DINOLAB_OFFLINE"):
        try:
            return download_weights(url, dest, sha256, progress)
        except OSError as e:
            raise WeightsNotFoundError(f"{head.name}: head not cached and download failed "
                                       f"({getattr(e, 'reason', e)}); download {url} to {dest}") from None
    raise WeightsNotFoundError(f"{head.name}: head not found offline; download {url} to {dest}")


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class SegHeadCheckpoint:
    """A segmentation head read from disk, with what is needed to use it.

    Attributes:
        state_dict: head parameters with our keys (``bn.*``, ``conv_seg.*``).
        classes, palette: class names and display colours.
        n_layers: blocks the head reads (None: decided from the backbone width, external files).
        settings: preprocessing and inference it was trained/evaluated with (``short_side``,
            ``round_to_patch``, ``inference``, ``ignore_index``, ``model`` = backbone id).
        source: file path or official name.
    """

    state_dict: dict[str, Tensor]
    classes: list[str]
    palette: list[tuple[int, int, int]]
    n_layers: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.state_dict["conv_seg.weight"].shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.state_dict["conv_seg.weight"].shape[0])

    @property
    def inference(self) -> Inference:
        return Inference(**{**self.settings.get("inference", {}),
                            "scales": tuple(self.settings.get("inference", {}).get("scales", (1.0,)))})

    def build(self, embed_dim: int) -> LinearSegHead:
        """The head, checked against a backbone of width ``embed_dim``."""
        n = self.n_layers or self.in_channels // embed_dim
        if self.in_channels != n * embed_dim or n not in (1, 4):
            raise SegmentationError(
                f"head {self.source} reads {self.in_channels} channels, which is not "
                f"{'1 or 4' if self.n_layers is None else self.n_layers} x the backbone width {embed_dim}: "
                f"use the backbone it was trained with ({self.settings.get('model') or 'see its name'})")
        head = LinearSegHead(self.in_channels, self.num_classes, n_layers=n)
        head.load_state_dict(self.state_dict, strict=True)
        return head.eval()


def read_seg_head(source: str | os.PathLike, *, sha256: str | None = None, progress: bool = True
                  ) -> SegHeadCheckpoint:
    """Read a head: an official name (``dinov2_vits14_ade20k_ms``, see ``OFFICIAL_HEADS``), a run folder
    of ``dinolab seg train`` (its ``head.pth``) or a ``.pth`` in mmseg layout (ours or the release's)."""
    official = OFFICIAL_HEADS.get(str(source))
    if official is not None:
        path = resolve_official_head(official, sha256=sha256, progress=progress)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "head.pth"
        if not path.is_file():
            known = ", ".join(sorted(OFFICIAL_HEADS)[:4])
            raise SegmentationError(f"head {source} is neither a file, a run folder with head.pth, nor an official "
                                    f"head name ({known}, ...)")
        verify_file(path, sha256)
    ckpt = safe_torch_load(path, error=SegmentationError)
    if not isinstance(ckpt, dict):
        raise SegmentationError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    sd = ckpt.get("state_dict", ckpt)
    head_sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX) and isinstance(v, Tensor)}
    needed = {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "conv_seg.weight", "conv_seg.bias"}
    if not needed <= set(head_sd):
        raise SegmentationError(f"{path} is not a linear segmentation head: missing "
                                f"{sorted(PREFIX + k for k in needed - set(head_sd))} (expected mmseg BNHead keys)")
    if head_sd["conv_seg.weight"].shape[2:] != (1, 1):
        raise SegmentationError(f"{path}: conv_seg is {tuple(head_sd['conv_seg.weight'].shape)}, not a 1x1 conv")
    head_sd.setdefault("bn.num_batches_tracked", torch.tensor(0))
    meta = ckpt.get("meta") or {}
    ours = dict(meta.get("dinolab") or {})
    k = int(head_sd["conv_seg.weight"].shape[0])
    names, colours = meta.get("CLASSES"), meta.get("PALETTE")  # tuples, lists or numpy arrays
    classes = [str(c) for c in names] if names is not None and len(names) else _default_classes(official, k)
    palette = ([tuple(int(v) for v in c) for c in colours] if colours is not None and len(colours)
               else distinct_palette(k) if official is None or official.dataset != "voc2012" else voc_palette(k))
    if len(classes) != k or len(palette) < k:
        raise SegmentationError(f"{path}: meta has {len(classes)} classes / {len(palette)} colours for a {k}-class head")
    if official is not None:
        ours = {"model": official.backbone, "short_side": official.short_side, "round_to_patch": False,
                "inference": official.inference.as_dict(), "ignore_index": 255, "official": official.name, **ours}
    return SegHeadCheckpoint(state_dict=head_sd, classes=classes, palette=palette,
                             n_layers=ours.get("n_layers") or (official.n_layers if official else None),
                             settings=ours, source=str(source))


def _default_classes(official: OfficialHead | None, k: int) -> list[str]:
    if official is not None and official.dataset == "voc2012" and k == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [str(i) for i in range(k)]


def save_seg_head(path: str | os.PathLike, head: LinearSegHead, *, classes: Sequence[str],
                  palette: Sequence[Sequence[int]], settings: dict[str, Any]) -> Path:
    """Write ``head`` in mmseg's layout (readable by the official tools) with our settings in
    ``meta["dinolab"]``, atomically."""
    sd = {PREFIX + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {"CLASSES": [str(c) for c in classes], "PALETTE": [[int(v) for v in c] for c in palette],
            "dinolab": {**settings, "n_layers": head.n_layers}}
    return atomic_write(path, lambda f: torch.save({"state_dict": sd, "meta": meta}, f))


def head_kind(name: str) -> int:
    """Number of layers of a head kind (``linear`` -> 1, ``linear4`` -> 4)."""
    if name not in HEAD_LAYERS:
        raise SegmentationError(f"head must be one of {sorted(HEAD_LAYERS)}, got {name!r}")
    return HEAD_LAYERS[name]

