"""Trained heads on a served backbone: semantic segmentation and monocular depth.

Thin adapters over the evaluation code, so the server runs exactly what ``dinolab seg`` and
``dinolab depth`` run:

- :class:`SegmentationHead`: a linear head of ``dinolab.eval.segmentation`` (``read_seg_head``: an
  official name such as ``dinov2_vits14_ade20k_linear``, a ``dinolab seg train`` run folder or a
  ``head.pth``), applied with that head's preprocessing and window settings, one scale, no flip
  (the multi-scale ``+ms`` test-time augmentation is 10 passes: too slow for an interactive demo).
- :class:`DepthHead`: a head of ``dinolab.eval.depth_heads`` (``load_depth_head``: an official name
  such as ``dinov2_vits14_nyu_linear4`` or a ``dinolab depth train`` ``head.pth``), run by
  ``dinolab.eval.depth.predict_depth``.

Both check at load time that the head fits the backbone (width, depth) and fail with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinolab.errors import DinolabError


def _device(backbone: nn.Module) -> torch.device:
    return next(backbone.parameters()).device


class SegmentationHead:
    """A linear segmentation head (``dinolab.eval.segmentation``) bound to a backbone."""

    def __init__(self, source: str, backbone: nn.Module) -> None:
        from dinolab.eval.segmentation import Inference, read_seg_head
        from dinolab.eval.segmentation_jobs import Resize, build_segmenter

        ckpt = read_seg_head(source)
        dev = _device(backbone)
        self.segmenter, self.device = build_segmenter(backbone, ckpt, str(dev))
        self.source = str(source)
        self.classes = list(ckpt.classes)
        self.palette = [tuple(int(v) for v in c) for c in ckpt.palette[: len(self.classes)]]
        s = ckpt.settings
        patch = int(backbone.patch_size)
        short = s.get("short_side") or 32 * patch  # None (native resolution) would pass any upload whole
        self.resize = Resize(int(short), patch, bool(s.get("round_to_patch", True)))
        inf = ckpt.inference
        self.inference = Inference(mode=inf.mode, crop=inf.crop, stride=inf.stride)  # one scale, no flip
        self.n_layers = int(self.segmenter.head.n_layers)

    def info(self) -> dict[str, Any]:
        return {"source": self.source, "classes": len(self.classes), "layers": self.n_layers,
                "short_side": self.resize.short_side, "inference": self.inference.mode}

    def predict(self, img: Image.Image, out_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W) class indices at PIL ``out_size`` (W, H), and the patch grid the backbone saw.

        The image is resized as the head was trained (its ``short_side``), with the long side capped at
        twice that so an extreme aspect ratio cannot blow up the input.
        """
        from dinolab.eval.segmentation import segment
        from dinolab.eval.segmentation_jobs import Resize
        from dinolab.serve.tasks import capped_short_side

        r = self.resize
        r = Resize(capped_short_side(img.width, img.height, r.short_side, 2 * r.short_side, r.patch), r.patch,
                   r.round_to_patch)
        x = r.image(img)[None].to(self.device)  # (1, 3, H', W')
        with torch.inference_mode():
            probs = segment(self.segmenter, x, self.inference, out_size=(out_size[1], out_size[0]))
        grid = (math.ceil(x.shape[-2] / r.patch), math.ceil(x.shape[-1] / r.patch))  # centre-padded
        return probs.argmax(1)[0].cpu().numpy(), grid


class DepthHead:
    """A depth head (``dinolab.eval.depth_heads``) bound to a backbone."""

    def __init__(self, source: str, backbone: nn.Module) -> None:
        from dinolab.eval.depth_heads import load_depth_head

        depth = len(getattr(backbone, "blocks", []))
        self.loaded = load_depth_head(source, embed_dim=int(backbone.embed_dim), depth=depth)
        cfg = self.loaded.config
        if cfg.embed_dim != backbone.embed_dim or max(cfg.layers) >= depth:
            trained_on = self.loaded.backbone or "see its run folder"
            blocks = list(cfg.layers)
            raise DinolabError(f"depth head {source} reads blocks {blocks} of a {cfg.embed_dim}-wide "
                               f"backbone; the served one is {backbone.embed_dim} wide with {depth} blocks: "
                               f"pair it with the backbone it was trained on ({trained_on})")
        self.loaded.head.to(_device(backbone)).eval()
        self.source = str(source)

    def info(self) -> dict[str, Any]:
        cfg = self.loaded.config
        return {"source": self.source, "kind": cfg.kind, "layers": list(cfg.layers),
                "min_depth": cfg.min_depth, "max_depth": cfg.max_depth}

    def predict(self, backbone: nn.Module, img: Image.Image,
                short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W) depth in metres at ``img``'s size, and the patch grid (input short side ``short_side``)."""
        from dinolab.eval.depth import predict_depth

        with torch.inference_mode():
            depth = predict_depth(backbone, self.loaded.head, self.loaded.config, img, short_side=short_side)
        p, s = int(backbone.patch_size), short_side / min(img.size)
        return depth, (math.ceil(round(img.height * s) / p), math.ceil(round(img.width * s) / p))


def load_seg_head(source: str, backbone: nn.Module) -> SegmentationHead:
    """A :class:`SegmentationHead` for ``backbone`` (already on its device) from ``source``."""
    _check_source(source, "seg_head")
    return SegmentationHead(source, backbone)


def load_depth_head(source: str, backbone: nn.Module) -> DepthHead:
    """A :class:`DepthHead` for ``backbone`` (already on its device) from ``source``."""
    _check_source(source, "depth_head")
    return DepthHead(source, backbone)


def _check_source(source: str, key: str) -> None:
    if not source or not isinstance(source, str):
        raise DinolabError(f"{key}: give an official head name or a head checkpoint path, got {source!r}")
    if ("/" in source or source.endswith(".pth")) and not Path(source).exists():
        raise DinolabError(f"{key}: {source} does not exist")
