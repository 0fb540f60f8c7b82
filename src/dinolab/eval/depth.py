"""Monocular depth on frozen features: the train / eval jobs behind ``dinolab depth`` (``predict``:
``dinolab.eval.depth_predict``).

Pipeline of one image (``prepare_image`` -> backbone -> head -> ``to_depth_map``):

1. optional resize by ``scale`` (``short_side`` / the image's short side), ImageNet normalisation,
   zero padding (= the mean colour) centred to a multiple of the patch size, as the official
   ``CenterPadding``;
2. ``get_intermediate_layers(x, n=<head layers>, reshape=True, return_class_token=True,
   norm=False)``: tokens before the final LayerNorm, as the official depth evaluation;
3. the head (``dinolab.eval.depth_heads``), clamped to [min_depth, max_depth] at inference;
4. back to the depth map's size: ``unpad="crop"`` upsamples to the padded size and cuts the padding
   off (pixel-aligned); ``unpad="stretch"`` resizes the padded prediction to the image size as the
   official ``encode_decode`` does (reproduces the official demo; off by up to half a patch).

Training (``train_depth_head``) follows the official recipe where it can on small data: AdamW
(wd 0.01), linear warm-up over the first third then cosine decay (mmcv ``CosineAnnealing``,
warm-up ratio 1e-3), gradient clipping at 35, SigLoss (+ an optional gradient loss), the loss on
the prediction resized to the ground-truth size. Without augmentation the backbone runs once per
image and the head trains on the cached tokens; ``augment=True`` runs the backbone every step on a
random crop (``crop_fraction`` of each side) with random horizontal flips. The run folder gets
``options.json``, ``head.pth`` (official layout, atomic, rewritten every epoch), ``metrics.jsonl``
(one line per epoch), ``results.json`` and ``samples/*.png`` (image | ground truth | prediction).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from dinolab.data.depth import DepthDataset, DepthSample
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinolab.errors import DinolabError
from dinolab.eval.depth_heads import (
    DepthHeadConfig,
    LoadedHead,
    build_head,
    make_head_config,
    save_depth_head,
)
from dinolab.eval.features import _precision
from dinolab.eval.metrics import depth_metrics, mean_depth_metrics
from dinolab.io import atomic_write_json, json_safe
from dinolab.losses.depth import GradientLoss, SigLoss

log = logging.getLogger(__name__)

UNPAD_MODES = ("crop", "stretch")
_normalize = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Geometry:
    """How a network input relates to its depth map: original (H, W), resized (H, W), centre padding
    (top, bottom, left, right) up to a multiple of the patch size."""

    size: tuple[int, int]
    scaled: tuple[int, int]
    pad: tuple[int, int, int, int]

    @property
    def padded(self) -> tuple[int, int]:
        return self.scaled[0] + self.pad[0] + self.pad[1], self.scaled[1] + self.pad[2] + self.pad[3]


def image_scale(height: int, width: int, short_side: int | None) -> float:
    """Resize factor so the short side becomes ``short_side`` (1.0 for None: native resolution)."""
    return 1.0 if short_side is None else short_side / min(height, width)


def prepare_image(image: Image.Image, patch_size: int, scale: float = 1.0) -> tuple[Tensor, Geometry]:
    """(3, H', W') normalised, centre-padded network input and its :class:`Geometry`."""
    size = (image.height, image.width)
    scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    if scaled != size:
        image = image.resize((scaled[1], scaled[0]), Image.Resampling.BICUBIC)
    ph, pw = -scaled[0] % patch_size, -scaled[1] % patch_size
    pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    x = F.pad(_normalize(image), (pad[2], pad[3], pad[0], pad[1]))  # zero = the mean colour
    return x, Geometry(size, scaled, pad)


def to_depth_map(pred: Tensor, geom: Geometry, unpad: str = "crop") -> Tensor:
    """Head output (B, 1, h, w) -> (B, 1, H, W) on the depth map's pixels (bilinear)."""
    if unpad == "crop":
        x = F.interpolate(pred, size=geom.padded, mode="bilinear", align_corners=False)
        top, _, left, _ = geom.pad
        x = x[..., top: top + geom.scaled[0], left: left + geom.scaled[1]]
    elif unpad == "stretch":
        x = F.interpolate(pred, size=geom.scaled, mode="bilinear", align_corners=False)
    else:
        raise DinolabError(f"unpad must be one of {UNPAD_MODES}, got {unpad!r}")
    if geom.scaled != geom.size:
        x = F.interpolate(x, size=geom.size, mode="bilinear", align_corners=False)
    return x


def check_backbone(model: nn.Module, cfg: DepthHeadConfig | None = None) -> int:
    """Depth (number of blocks) of a backbone usable here (and by the head ``cfg``); raises otherwise."""
    for attr in ("get_intermediate_layers", "patch_size", "embed_dim", "blocks"):
        if not hasattr(model, attr):
            raise DinolabError(f"{type(model).__name__} has no {attr}: pass a dinolab backbone (dinolab.load_model) "
                               "or a module with the same get_intermediate_layers interface")
    depth = len(model.blocks)
    if cfg is not None and (cfg.embed_dim != model.embed_dim or max(cfg.layers) >= depth):
        raise DinolabError(f"the head reads blocks {list(cfg.layers)} of width {cfg.embed_dim}, but the backbone "
                           f"has {depth} blocks of width {model.embed_dim}: pass the --model the head was trained on")
    return depth


def backbone_features(model: nn.Module, x: Tensor, cfg: DepthHeadConfig) -> list[tuple[Tensor, Tensor]]:
    """Per head layer: (patch tokens (B, D, h, w), CLS (B, D)), float32."""
    outs = model.get_intermediate_layers(x, n=list(cfg.layers), reshape=True, return_class_token=True,
                                         norm=cfg.final_norm)
    return [(p.float(), c.float()) for p, c in outs]


# ------------------------------------------------------------------------------ inference


def _module_device(model: nn.Module) -> torch.device:
    """Where the module's parameters (or buffers) live; CPU for a module without either."""
    return next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device


@torch.no_grad()
def predict_depth(model: nn.Module, head: nn.Module, cfg: DepthHeadConfig, image: Image.Image, *,
                  short_side: int | None = None, unpad: str = "crop", flip_tta: bool = False,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Depth map (H, W) float32 in metres of one RGB image, at the image's own size.

    ``flip_tta`` averages with the prediction of the mirrored image (the official test pipeline).
    Backbone and head are moved to ``device`` (default: the backbone's) and put in eval mode.
    """
    dev = torch.device(device) if device else _module_device(model)
    model.to(dev).eval()
    head.to(dev).eval()
    _, dtype = _precision(dev, None)
    x, geom = prepare_image(image, model.patch_size, image_scale(image.height, image.width, short_side))
    batch = x[None].to(dev)
    if flip_tta:
        batch = torch.cat([batch, batch.flip(-1)])
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        feats = backbone_features(model, batch, cfg)
    pred = head(feats).float().clamp(cfg.min_depth, cfg.max_depth)  # (B, 1, h, w)
    if flip_tta:
        pred = (pred[:1] + pred[1:].flip(-1)) / 2
    return to_depth_map(pred, geom, unpad)[0, 0].cpu().numpy()


# --------------------------------------------------------------------------- feature cache


@dataclass
class _Item:
    """One cached training/validation image: head inputs (no batch dim), ground truth (1, H, W), geometry."""

    id: str
    feats: list[tuple[Tensor, Tensor]]
    gt: Tensor
    geom: Geometry


@dataclass
class _Runner:
    """The frozen backbone and how it runs."""

    model: nn.Module
    cfg: DepthHeadConfig
    device: torch.device
    dtype: torch.dtype | None
    short_side: int | None
    progress: bool

    @torch.no_grad()
    def features(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return backbone_features(self.model, x.to(self.device), self.cfg)

    def prepare(self, sample: DepthSample, scale: float | None = None) -> tuple[Tensor, Geometry]:
        img = sample.image
        return prepare_image(img, self.model.patch_size,
                             image_scale(img.height, img.width, self.short_side) if scale is None else scale)

    def cache(self, ds: DepthDataset, desc: str, batch_size: int = 8) -> list[_Item]:
        """Run the backbone once over ``ds`` (consecutive same-size images batched)."""
        items: list[_Item] = []
        pending: list[tuple[DepthSample, Tensor, Geometry]] = []

        def flush() -> None:
            feats = self.features(torch.stack([x for _, x, _ in pending]))
            for b, (s, _, geom) in enumerate(pending):
                items.append(_Item(s.id, [(p[b].cpu(), c[b].cpu()) for p, c in feats],
                                   torch.from_numpy(s.depth)[None], geom))
            pending.clear()

        for i in tqdm(range(len(ds)), desc=desc, unit="img", disable=not self.progress):
            s = ds.load(i)
            x, geom = self.prepare(s)
            if pending and (geom != pending[0][2] or len(pending) == batch_size):
                flush()
            pending.append((s, x, geom))
        if pending:
            flush()
        return items


def _group_batches(keys: Sequence[Any], batch_size: int, gen: torch.Generator | None) -> list[list[int]]:
    """Batches of indices with equal ``keys`` (same geometry); shuffled when ``gen`` is given."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    batches = []
    for idx in groups.values():
        if gen is not None:
            idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        batches += [idx[j: j + batch_size] for j in range(0, len(idx), batch_size)]
    if gen is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def _stack(items: Sequence[_Item], device: torch.device) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    feats = [(torch.stack([it.feats[k][0] for it in items]).to(device),
              torch.stack([it.feats[k][1] for it in items]).to(device)) for k in range(len(items[0].feats))]
    return feats, torch.stack([it.gt for it in items]).to(device)


# ------------------------------------------------------------------------------ schedule


def lr_at(step: int, total: int, base_lr: float, *, warmup: float = 1 / 3, warmup_ratio: float = 1e-3,
          min_ratio: float = 1e-8) -> float:
    """mmcv ``CosineAnnealing`` with linear warm-up, as the official depth configs (12,800 of 38,400
    iterations warm-up): cosine from ``base_lr`` to ``min_ratio * base_lr`` over all steps, times a
    factor rising linearly from ``warmup_ratio`` to 1 over the first ``warmup`` fraction."""
    target = base_lr * min_ratio
    lr = target + 0.5 * (base_lr - target) * (1 + math.cos(math.pi * step / max(total, 1)))
    n_warm = int(warmup * total)
    if step < n_warm:
        lr *= 1 - (1 - step / n_warm) * (1 - warmup_ratio)
    return lr


# ------------------------------------------------------------------------------- training


@dataclass
class _Trainer:
    head: nn.Module
    cfg: DepthHeadConfig
    opt: torch.optim.Optimizer
    sig: SigLoss
    grad: GradientLoss | None
    lr: float
    total: int
    sig_warmup: int
    unpad: str
    step: int = 0

    def update(self, feats: list[tuple[Tensor, Tensor]], gt: Tensor, geom: Geometry) -> float:
        """One optimisation step on a batch; returns the loss."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total, self.lr)
        self.head.train()
        pred = to_depth_map(self.head(feats), geom, self.unpad)  # (B, 1, H, W)
        loss = self.sig(pred, gt, warmup=self.step < self.sig_warmup)
        if self.grad is not None:
            loss = loss + self.grad(pred, gt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.head.parameters(), 35.0)
        self.opt.step()
        self.step += 1
        return float(loss.detach())


@torch.no_grad()
def _evaluate_cached(head: nn.Module, cfg: DepthHeadConfig, items: list[_Item], ds: DepthDataset,
                     device: torch.device, unpad: str) -> tuple[dict[str, float], list[dict]]:
    """Mean and per-image metrics of the head on cached validation tokens."""
    head.eval()
    per_image = []
    for idx in _group_batches([it.geom for it in items], 8, None):
        feats, gt = _stack([items[i] for i in idx], device)
        pred = to_depth_map(head(feats).clamp(cfg.min_depth, cfg.max_depth), items[idx[0]].geom, unpad)
        for b, i in enumerate(idx):
            m = depth_metrics(pred[b, 0], gt[b, 0], min_depth=ds.min_depth, max_depth=ds.max_depth, crop=ds.crop)
            per_image.append({"id": items[i].id, **m})
    return mean_depth_metrics([{k: v for k, v in m.items() if k != "id"} for m in per_image]), per_image


def _random_crop_flip(sample: DepthSample, frac: float, gen: torch.Generator) -> DepthSample:
    """A random crop (``frac`` of each side) of image and depth together, mirrored half of the time."""
    w, h = sample.image.size
    ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    image = sample.image.crop((left, top, left + cw, top + ch))
    depth = sample.depth[top: top + ch, left: left + cw]
    if bool(torch.rand((), generator=gen) < 0.5):
        image, depth = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), depth[:, ::-1]
    return DepthSample(sample.id, image, np.ascontiguousarray(depth))


def _augmented_epoch(runner: _Runner, trainer: _Trainer, ds: DepthDataset, sizes: list[tuple[int, int]],
                     batch_size: int, frac: float, gen: torch.Generator, bar: tqdm) -> list[float]:
    """One epoch with the backbone on freshly cropped/flipped images (same-size originals batched)."""
    losses = []
    for idx in _group_batches(sizes, batch_size, gen):
        samples = [_random_crop_flip(ds.load(i), frac, gen) for i in idx]
        h, w = sizes[idx[0]]
        scale = image_scale(h, w, runner.short_side)  # the full image's scale: objects keep their size
        prepared = [runner.prepare(s, scale) for s in samples]
        feats = runner.features(torch.stack([x for x, _ in prepared]))
        gt = torch.stack([torch.from_numpy(s.depth)[None] for s in samples]).to(runner.device)
        losses.append(trainer.update(feats, gt, prepared[0][1]))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _cached_epoch(trainer: _Trainer, items: list[_Item], batch_size: int, gen: torch.Generator,
                  device: torch.device, bar: tqdm) -> list[float]:
    losses = []
    for idx in _group_batches([it.geom for it in items], batch_size, gen):
        feats, gt = _stack([items[i] for i in idx], device)
        losses.append(trainer.update(feats, gt, items[idx[0]].geom))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:  # reads the header only
        return img.height, img.width


def train_depth_head(
    model: nn.Module, train: DepthDataset, val: DepthDataset | None = None, *, head: str = "lin1",
    epochs: int = 10, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.01, grad_loss: float = 0.0,
    sigloss_warmup: float = 100 / 38400, augment: bool = False, crop_fraction: float = 0.875,
    short_side: int | None = None, unpad: str = "crop", seed: int = 0, device: str | None = None,
    out_dir: str | os.PathLike | None = None, save_png: int = 4, progress: bool = True,
    model_id: str = "in-memory", **head_settings: Any,
) -> tuple[dict, LoadedHead]:
    """Train a ``lin1`` / ``lin4`` / ``dpt`` depth head on a frozen backbone.

    Returns the results dict (what results.json holds) and the trained head (eval mode).

    Args:
        model: the backbone (frozen; never updated).
        train, val: datasets (``dinolab.data.depth``); their depth range also bounds the head's bins
            (``head_settings`` may override ``min_depth`` / ``max_depth``).
        head: ``"lin1"``, ``"lin4"`` or ``"dpt"``; ``head_settings`` go to the config
            (``n_bins``, ``bins``, ``norm_strategy``, ``channels``, ``final_norm`` ...).
        epochs, batch_size, lr, weight_decay: AdamW with the official warm-up + cosine schedule.
        grad_loss: weight of the gradient loss (0 = SigLoss only; the official KITTI config lists 0.5).
        sigloss_warmup: fraction of steps using SigLoss's warm-up form (official 100 of 38,400).
        augment: backbone every step on random crops + flips, instead of cached tokens.
        short_side: resize so the short side is this (None: native resolution, padded).
        unpad: ``"crop"`` or ``"stretch"`` (see the module docstring).
        out_dir: run folder (options.json, head.pth, metrics.jsonl, results.json, samples/).
        save_png: how many validation images to draw at the end.
    """
    depth = check_backbone(model)
    if epochs < 1 or batch_size < 1 or not 0 < crop_fraction <= 1 or len(train) == 0:
        raise DinolabError(f"need epochs >= 1, batch_size >= 1, 0 < crop_fraction <= 1 and a non-empty training "
                           f"set; got {epochs}, {batch_size}, {crop_fraction}, {len(train)} images")
    head_settings = {"min_depth": train.min_depth, "max_depth": train.max_depth, **head_settings}
    cfg = make_head_config(head, model.embed_dim, depth, **head_settings)
    dev, dtype = _precision(device, None)
    model.to(dev).eval().requires_grad_(False)
    torch.manual_seed(seed)
    net = build_head(cfg).to(dev)
    runner = _Runner(model, cfg, dev, dtype, short_side, progress)
    options = {"head": head, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "grad_loss": grad_loss, "sigloss_warmup": sigloss_warmup, "augment": augment,
               "crop_fraction": crop_fraction, "short_side": short_side, "unpad": unpad, "seed": seed}
    res: dict[str, Any] = {"task": "depth-train", "model": model_id, "head_config": cfg.to_dict(),
                           "options": options, "train": _ds_info(train),
                           "val": _ds_info(val) if val is not None else None}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "options.json", res)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    items = None if augment else runner.cache(train, "features train", batch_size)
    sizes = [_image_size(p) for p in train.rgb] if augment else None
    val_items = runner.cache(val, "features val", batch_size) if val is not None else None
    steps = len(_group_batches(sizes if augment else [it.geom for it in items], batch_size, None))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    trainer = _Trainer(net, cfg, opt, SigLoss(max_depth=cfg.max_depth),
                       GradientLoss(grad_loss, max_depth=cfg.max_depth) if grad_loss else None, lr,
                       epochs * steps, round(sigloss_warmup * epochs * steps), unpad)
    gen = torch.Generator().manual_seed(seed)
    history = []
    with tqdm(total=epochs * steps, desc=f"depth {head}", unit="step", disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            losses = (_augmented_epoch(runner, trainer, train, sizes, batch_size, crop_fraction, gen, bar) if augment
                      else _cached_epoch(trainer, items, batch_size, gen, dev, bar))
            row = {"epoch": epoch, "step": trainer.step, "loss": float(np.mean(losses)),
                   "lr": lr_at(trainer.step - 1, trainer.total, lr)}
            if val_items is not None:
                row["val"] = json_safe(_evaluate_cached(net, cfg, val_items, val, dev, unpad)[0])
            history.append(row)
            if out is not None:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                save_depth_head(net, cfg, out / "head.pth", model=model_id, epoch=epoch)
            log.info("epoch %d: loss %.4f%s", epoch, row["loss"],
                     f", val rmse {row['val']['rmse']:.3f} m" if "val" in row else "")
    res["history"] = history
    res["wall_s"] = time.perf_counter() - t0
    if val_items is not None:
        res["val_metrics"], res["val_per_image"] = json_safe(_evaluate_cached(net, cfg, val_items, val, dev, unpad))
        res["headline"] = {"metric": "val rmse (m)", "value": res["val_metrics"]["rmse"]}
    if out is not None:
        res["head_path"] = str(out / "head.pth")
        if val is not None and save_png:
            draw_samples(model, net, cfg, val, out / "samples", save_png, short_side, unpad, dev)
        atomic_write_json(out / "results.json", res)
        log.info("wrote %s", out / "results.json")
    return res, LoadedHead(net.eval(), cfg, {"model": model_id}, model_id)


def draw_samples(*args: Any) -> None:
    """``dinolab.eval.depth_predict.draw_samples`` (imported here late: that module imports this one)."""
    from dinolab.eval.depth_predict import draw_samples as draw

    draw(*args)


def _ds_info(ds: DepthDataset) -> dict:
    """Name, image counts (every listed image is scored: a bad one stops the run), range and crop."""
    return {"name": ds.name, "n": len(ds), "n_listed": len(ds), "n_scored": len(ds), "n_skipped": 0,
            "min_depth": ds.min_depth, "max_depth": ds.max_depth, "crop": ds.crop}


# ------------------------------------------------------------------------- eval and predict


def evaluate_depth(model: nn.Module, loaded: LoadedHead, ds: DepthDataset, *, short_side: int | None = None,
                   unpad: str = "crop", flip_tta: bool = False, device: str | None = None,
                   out_dir: str | os.PathLike | None = None, save_png: int = 4, progress: bool = True,
                   model_id: str = "in-memory", head_id: str = "in-memory") -> dict:
    """Metrics of a head on ``ds`` (its range and crop): the mean over images of RMSE, AbsRel, log10,
    delta<1.25^k (and sq_rel, rmse_log, silog), plus the per-image values; with ``out_dir`` writes
    results.json and ``samples/*.png`` of the first ``save_png`` images."""
    check_backbone(model, loaded.config)
    dev, _ = _precision(device, None)
    per_image = []
    t0 = time.perf_counter()
    for i in tqdm(range(len(ds)), desc="depth eval", unit="img", disable=not progress):
        s = ds.load(i)
        pred = predict_depth(model, loaded.head, loaded.config, s.image, short_side=short_side, unpad=unpad,
                             flip_tta=flip_tta, device=dev)
        m = depth_metrics(pred, s.depth, min_depth=ds.min_depth, max_depth=ds.max_depth, crop=ds.crop)
        per_image.append({"id": s.id, **m})
    metrics = json_safe(mean_depth_metrics([{k: v for k, v in m.items() if k != "id"} for m in per_image]))
    per_image = json_safe(per_image)  # null: an image without valid ground truth
    res = {"task": "depth-eval", "model": model_id, "head": head_id, "head_config": loaded.config.to_dict(),
           "dataset": _ds_info(ds), "options": {"short_side": short_side, "unpad": unpad, "flip_tta": flip_tta},
           "metrics": metrics, "per_image": per_image, "wall_s": time.perf_counter() - t0,
           "headline": {"metric": "rmse (m)", "value": metrics["rmse"]}}
    if out_dir is not None:
        out = Path(out_dir)
        if save_png:
            draw_samples(model, loaded.head, loaded.config, ds, out / "samples", save_png, short_side, unpad, dev)
        atomic_write_json(out / "results.json", res)
        log.info("wrote %s", out / "results.json")
    return res
