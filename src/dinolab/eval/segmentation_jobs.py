"""Segmentation jobs behind ``dinolab seg train | eval`` (``predict``: ``segmentation_predict``).

``run_seg_train`` trains a linear head on a frozen backbone and writes a run folder::

    options.json            every option of the run (and the model id)
    head.pth                the head, mmseg layout (``dinolab.eval.segmentation.save_seg_head``), atomic
    metrics.jsonl           one line per epoch: lr, train loss, val mIoU / pixel accuracy, wall time
    results.json            mIoU, per-class IoU and accuracy, pixel accuracy, dataset sizes and hashes, times
    confusion_matrix.png    pixel confusion matrix of the final evaluation

Without augmentation (the default) every training image goes through the backbone once: the patch
maps of the last ``n_layers`` blocks are kept in memory and the head trains on them for all epochs
(what makes CPU training fast). ``augment=True`` runs the backbone every step on a random rescale
(0.5-2x) + crop + flip of each image. Validation features (one scale, whole image) are cached in
both cases for the per-epoch numbers.

The optimisation is the official linear-head recipe (dinov2 ``*_linear_config.py``): AdamW (lr 1e-3,
weight decay 1e-4, betas 0.9/0.999), linear warm-up over the first 3.75% of the iterations (1500 of
40k), then a linear (poly, power 1) decay to 0; cross-entropy with the ignore index, averaged over
the labelled pixels (mmseg averages over all pixels, ``avg_non_ignore=False``: the same gradient
direction, a different scale). Not reproduced: ``cat_max_ratio`` crop re-draws and photometric
distortion in the augmentation path.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinolab.data.segmentation import SegmentationDataset, SegmentationError
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MAX_LONG_SIDE_FACTOR, dense_size
from dinolab.eval.features import _precision
from dinolab.eval.metrics import plot_confusion_matrix, segmentation_confusion, segmentation_scores
from dinolab.eval.segmentation import (
    Inference,
    LinearSegHead,
    SegHeadCheckpoint,
    Segmenter,
    head_kind,
    save_seg_head,
    segment,
)
from dinolab.io import atomic_write_json, json_safe

log = logging.getLogger(__name__)

WARMUP_FRACTION = 1500 / 40000  # the official schedule: 1500 warm-up iterations of 40k


# --------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Resize:
    """Image size before the backbone: short side ``short_side`` (None: unchanged), aspect kept;
    ``round_to_patch`` also rounds each side to a multiple of ``patch`` (else the model pads)."""

    short_side: int | None
    patch: int
    round_to_patch: bool = True

    def size(self, h: int, w: int) -> tuple[int, int]:
        """(H', W'); the long side is capped as in ``dense_size`` (at most 2 x the short side)."""
        if self.round_to_patch:
            return dense_size(h, w, self.patch, self.short_side)
        s = 1.0 if self.short_side is None else min(self.short_side / min(h, w),
                                                    MAX_LONG_SIDE_FACTOR * self.short_side / max(h, w))
        return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))

    def image(self, img: Image.Image) -> Tensor:
        """PIL RGB -> (3, H', W') normalised float tensor (bicubic resize)."""
        h, w = self.size(img.height, img.width)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]

    def mask(self, labels: np.ndarray) -> Tensor:
        """(H, W) labels -> (H', W') int64 at the resized image size (nearest)."""
        h, w = self.size(*labels.shape)
        if (h, w) != labels.shape:
            labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
        return torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------ feature caching


@dataclass
class FeatureCache:
    """Patch maps of a split, computed once: ``feats[i]`` (n_layers * D, h, w), labels ``labels[i]``
    (H, W) int64 at the size the loss or metric needs."""

    feats: list[Tensor]
    labels: list[Tensor]
    ids: list[str]


def cache_features(segmenter: Segmenter, ds: SegmentationDataset, resize: Resize, *, device: torch.device,
                   original_labels: bool, dtype: torch.dtype = torch.float32, progress: bool = True,
                   desc: str = "features") -> FeatureCache:
    """One backbone pass per image. Labels at the original size (``original_labels``, for metrics) or
    resized with the image (for the training loss)."""
    feats, labels = [], []
    for i in tqdm(range(len(ds)), desc=desc, disable=not progress, leave=False):
        img, mask = ds.load(i)
        x = resize.image(img)[None].to(device)
        with torch.inference_mode():
            maps = segmenter.features(x)
        feats.append(torch.cat(maps, dim=1)[0].to("cpu", dtype))  # (n * D, h, w)
        labels.append(torch.from_numpy(mask) if original_labels else resize.mask(mask))
    return FeatureCache(feats, labels, list(ds.ids))


def _shape_batches(shapes: Sequence[tuple], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Random batches of indices whose items share a shape (feature maps are stacked)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(shapes):
        groups[s].append(i)
    batches = []
    for idx in groups.values():
        rng.shuffle(idx)
        batches += [idx[k: k + batch_size] for k in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------ augmentation


class AugmentedPairs(Dataset):
    """Random rescale (``scale_range`` x the ``resize`` size), crop ``crop`` x ``crop`` (padded with
    0 / ignore when smaller) and horizontal flip of (image, mask) pairs; returns normalised tensors."""

    def __init__(self, ds: SegmentationDataset, resize: Resize, crop: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 seed: int = 0) -> None:
        self.ds, self.resize, self.crop, self.scale_range, self.seed = ds, resize, crop, scale_range, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")  # reproducible, worker-independent
        img, mask = self.ds.load(i)
        h, w = self.resize.size(img.height, img.width)
        s = rng.uniform(*self.scale_range)
        h, w = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        labels = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
        x = Resize(None, self.resize.patch, round_to_patch=False).image(img)  # normalise only
        y = torch.from_numpy(labels.astype(np.int64))
        y0, x0 = rng.randint(0, max(h - self.crop, 0)), rng.randint(0, max(w - self.crop, 0))
        x, y = x[:, y0: y0 + self.crop, x0: x0 + self.crop], y[y0: y0 + self.crop, x0: x0 + self.crop]
        ph, pw = self.crop - x.shape[1], self.crop - x.shape[2]
        x = F.pad(x, (0, pw, 0, ph))
        y = F.pad(y, (0, pw, 0, ph), value=self.ds.ignore_index)
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


# ---------------------------------------------------------------------------------------- training


def poly_lr(it: int, total: int, base: float, warmup: int) -> float:
    """Official schedule: linear warm-up over ``warmup`` iterations, linear decay to 0 at ``total``."""
    lr = base * (1.0 - it / total)
    return lr * (it + 1) / warmup if it < warmup else lr


def class_weights_from(spec: str | Sequence[float] | None, labels: Sequence[Tensor], num_classes: int,
                       ignore_index: int) -> Tensor | None:
    """Loss weights: None, explicit values (one per class), or ``"median-freq"`` (SegNet's median
    frequency balancing, ``median(f) / f_c`` from the training labels; absent classes get 0)."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec != "median-freq":
        spec = [float(v) for v in spec.split(",")]
    if not isinstance(spec, str):
        w = torch.as_tensor(list(spec), dtype=torch.float32)
        if w.shape != (num_classes,) or (w < 0).any():
            raise SegmentationError(f"class weights: give {num_classes} non-negative values (one per class), got "
                                    f"{w.tolist()}; or 'median-freq'")
        return w
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for y in labels:
        y = y[y != ignore_index]
        counts += torch.bincount(y.reshape(-1), minlength=num_classes)[:num_classes].double()
    freq = counts / counts.sum()
    w = torch.where(freq > 0, freq[freq > 0].median() / freq.clamp(min=1e-12), torch.zeros_like(freq))
    return w.float()


def _loss(logits: Tensor, labels: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index)


def _cached_steps(cache: FeatureCache, batch_size: int, rng: random.Random, device: torch.device):
    for idx in _shape_batches([tuple(f.shape) for f in cache.feats], batch_size, rng):
        feats = torch.stack([cache.feats[i] for i in idx]).to(device, torch.float32)  # (B, n*D, h, w)
        labels = torch.stack([cache.labels[i] for i in idx]).to(device)  # (B, H, W)
        yield feats, labels


def _split_maps(feats: Tensor, n_layers: int) -> list[Tensor]:
    return list(feats.chunk(n_layers, dim=1))


def cached_scores(head: LinearSegHead, cache: FeatureCache, resize: Resize, num_classes: int, ignore_index: int,
                  device: torch.device) -> tuple[dict, Tensor]:
    """Scores of ``head`` on cached validation features; the same numbers as ``evaluate`` with one
    scale and the whole image: logits upsampled to the resized image, then to the original mask."""
    head.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.inference_mode():
        for f, y in zip(cache.feats, cache.labels):
            logits = head(_split_maps(f[None].to(device, torch.float32), head.n_layers))  # (1, K, h, w)
            logits = F.interpolate(logits, size=resize.size(*y.shape), mode="bilinear", align_corners=False)
            if logits.shape[-2:] != y.shape:
                logits = F.interpolate(logits, size=y.shape, mode="bilinear", align_corners=False)
            cm += segmentation_confusion(logits.argmax(1)[0].cpu(), y, num_classes, ignore_index)
    return segmentation_scores(cm), cm


@dataclass
class TrainOptions:
    """Plain options of ``run_seg_train`` (the CLI fills them)."""

    head: str = "linear"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    short_side: int | None = 448
    round_to_patch: bool = True
    augment: bool = False
    crop: int | None = None
    class_weights: str | list[float] | None = None
    seed: int = 0
    num_workers: int = 0
    cache_dtype: str = "float32"


def train_head(segmenter: Segmenter, train: SegmentationDataset, opts: TrainOptions, *, device: torch.device,
               resize: Resize, val_cache: FeatureCache | None, log_epoch: Callable[[dict], None],
               progress: bool = True) -> tuple[list[dict], Tensor | None, float]:
    """Train ``segmenter.head`` in place; returns (epoch logs, class weights, feature seconds)."""
    if opts.epochs < 1 or opts.batch_size < 1:
        raise SegmentationError(f"epochs and batch size must be >= 1, got {opts.epochs} and {opts.batch_size}")
    head, ignore = segmenter.head, train.ignore_index
    rng = random.Random(opts.seed)
    t0 = time.perf_counter()
    if opts.augment:
        if opts.crop is None and resize.short_side is None:
            raise SegmentationError("augmentation needs a crop size: pass --train-crop (or --short-side)")
        crop = opts.crop or resize.size(resize.short_side, resize.short_side)[0]  # official: crop = short side
        pairs = AugmentedPairs(train, resize, crop, seed=opts.seed)
        loader = DataLoader(pairs, batch_size=opts.batch_size, shuffle=True, num_workers=opts.num_workers,
                            generator=torch.Generator().manual_seed(opts.seed), drop_last=False)
        steps_per_epoch, cache, label_source = len(loader), None, None
    else:
        cache = cache_features(segmenter, train, resize, device=device, original_labels=False, progress=progress,
                               dtype=getattr(torch, opts.cache_dtype), desc="train features")
        steps_per_epoch = len(_shape_batches([tuple(f.shape) for f in cache.feats], opts.batch_size, random.Random(0)))
        label_source = cache.labels
    feat_s = time.perf_counter() - t0
    if label_source is None and opts.class_weights == "median-freq":
        label_source = [torch.from_numpy(train.load_mask(i)) for i in range(len(train))]
    weight = class_weights_from(opts.class_weights, label_source or [], len(train.classes), ignore)
    weight = weight.to(device) if weight is not None else None
    optim = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.999))
    total = opts.epochs * steps_per_epoch
    warmup = max(1, round(WARMUP_FRACTION * total))
    it, logs = 0, []
    bar = tqdm(total=total, desc="train head", disable=not progress)
    for epoch in range(opts.epochs):
        head.train()
        te, losses = time.perf_counter(), []
        if cache is not None:
            batches = _cached_steps(cache, opts.batch_size, rng, device)
        else:
            pairs.epoch = epoch
            batches = ((segmenter.features(x.to(device)), y.to(device)) for x, y in loader)
        for feats, labels in batches:
            maps = _split_maps(feats, head.n_layers) if isinstance(feats, Tensor) else feats
            for g in optim.param_groups:
                g["lr"] = poly_lr(it, total, opts.lr, warmup)
            loss = _loss(head(maps), labels, weight, ignore)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        row = {"epoch": epoch + 1, "iter": it, "lr": optim.param_groups[0]["lr"],
               "train_loss": float(np.mean(losses)) if losses else float("nan"), "epoch_s": time.perf_counter() - te}
        if val_cache is not None:
            scores, _ = cached_scores(head, val_cache, resize, len(train.classes), ignore, device)
            row.update(val_miou=scores["miou"], val_pixel_acc=scores["pixel_acc"])
        logs.append(row)
        log_epoch(row)
    bar.close()
    head.eval()
    return logs, weight, feat_s


# -------------------------------------------------------------------------------------- evaluation


def evaluate(segmenter: Segmenter, ds: SegmentationDataset, resize: Resize, inference: Inference, *,
             device: torch.device, progress: bool = True) -> tuple[dict, Tensor]:
    """Scores over ``ds`` at the masks' original resolution: each image is resized (``resize``),
    segmented with ``inference`` and its probabilities upsampled to its mask."""
    segmenter.eval()
    K = segmenter.head.num_classes
    if K != ds.num_classes:
        raise SegmentationError(f"the head predicts {K} classes but {ds.name} has {ds.num_classes}: evaluate on the "
                                "data the head was trained for")
    cm = torch.zeros(K, K, dtype=torch.int64)
    for i in tqdm(range(len(ds)), desc="evaluate", disable=not progress, leave=False):
        img, mask = ds.load(i)
        x = resize.image(img)[None].to(device)
        with torch.inference_mode():
            probs = segment(segmenter, x, inference, out_size=mask.shape)
        cm += segmentation_confusion(probs.argmax(1)[0].cpu(), torch.from_numpy(mask), K, ds.ignore_index)
    return segmentation_scores(cm), cm


def _named(scores: dict, classes: Sequence[str]) -> dict:
    """Scores by class name; undefined values (a class absent from the split) are None (JSON null)."""
    return json_safe({"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "macc": scores["macc"],
                      "per_class_iou": dict(zip(classes, scores["iou"])),
                      "per_class_acc": dict(zip(classes, scores["acc"]))})


def _described(ds: SegmentationDataset) -> dict:
    """``ds.describe()`` with the image counts: every listed image is scored (a bad one stops the run)."""
    return {**ds.describe(), "n_listed": len(ds), "n_scored": len(ds), "n_skipped": 0}


def _write_scores(out: Path, res: dict, cm: Tensor, classes: Sequence[str], title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(cm, list(classes), out / "confusion_matrix.png", title=title)
    atomic_write_json(out / "results.json", res)
    log.info("wrote %s", out / "results.json")


def run_seg_train(model: nn.Module, train: SegmentationDataset, val: SegmentationDataset | None,
                  opts: TrainOptions | None = None, *, inference: Inference | None = None,
                  model_id: str = "in-memory", out_dir: str | Path | None = None, device: str | None = None,
                  progress: bool = True) -> dict:
    """Train a ``linear``/``linear4`` head on frozen ``model`` features, evaluate it on ``val`` (or on
    ``train`` when no ``val``) with ``inference``, and write the run folder (see the module docstring)."""
    opts, inference = opts or TrainOptions(), inference or Inference()
    if val is not None and (val.classes != train.classes or val.ignore_index != train.ignore_index):
        raise SegmentationError(f"{train.name} and {val.name} differ in classes or ignore index: give both the "
                                "same --classes / --ignore-index")
    torch.manual_seed(opts.seed)
    dev, autocast = _precision(device, None)
    head = LinearSegHead(head_kind(opts.head) * model.embed_dim, train.num_classes, n_layers=head_kind(opts.head))
    segmenter = Segmenter(model, head, autocast=autocast).to(dev)
    resize = Resize(opts.short_side, segmenter.patch_size, opts.round_to_patch)
    out = Path(out_dir) if out_dir is not None else None
    options = {**vars(opts), "inference": inference.as_dict(), "model": model_id}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "options.json", options)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    def log_epoch(row: dict) -> None:
        msg = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        log.info("%s", msg)
        if out is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    eval_ds = val if val is not None else train
    val_cache = cache_features(segmenter, eval_ds, resize, device=dev, original_labels=True, progress=progress,
                               dtype=getattr(torch, opts.cache_dtype), desc="val features")
    t1 = time.perf_counter()
    logs, weight, feat_s = train_head(segmenter, train, opts, device=dev, resize=resize, val_cache=val_cache,
                                      log_epoch=log_epoch, progress=progress)
    t2 = time.perf_counter()
    if inference == Inference():  # one scale, whole image: the cached features give the same result
        scores, cm = cached_scores(head, val_cache, resize, train.num_classes, train.ignore_index, dev)
    else:
        scores, cm = evaluate(segmenter, eval_ds, resize, inference, device=dev, progress=progress)
    t3 = time.perf_counter()
    settings = {"model": model_id, "short_side": opts.short_side, "round_to_patch": opts.round_to_patch,
                "inference": inference.as_dict(), "ignore_index": train.ignore_index, "head": opts.head}
    res = {"task": "seg-train", "model": model_id, "head": opts.head, "options": options,
           "train": _described(train), "eval": {**_described(eval_ds), "split": "val" if val is not None else "train"},
           **_named(scores, train.classes), "epochs": logs,
           "class_weights": weight.tolist() if weight is not None else None,
           "headline": {"metric": "mIoU", "value": json_safe(scores["miou"])},
           "wall_s": {"val_features": t1 - t0, "train_features": feat_s, "train": t2 - t1 - feat_s, "eval": t3 - t2}}
    if out is not None:
        save_seg_head(out / "head.pth", head, classes=train.classes, palette=train.palette, settings=settings)
        _write_scores(out, res, cm, train.classes, f"{opts.head} head, mIoU {scores['miou']:.2f}")
    return res


def build_segmenter(model: nn.Module, ckpt: SegHeadCheckpoint, device: str | None = None) -> tuple[Segmenter, torch.device]:
    """Backbone + the checkpoint's head on ``device`` (bf16 backbone autocast on GPU)."""
    dev, autocast = _precision(device, None)
    return Segmenter(model, ckpt.build(model.embed_dim), autocast=autocast).to(dev).eval(), dev


def run_seg_eval(model: nn.Module, ckpt: SegHeadCheckpoint, ds: SegmentationDataset, *, inference: Inference,
                 short_side: int | None, round_to_patch: bool, model_id: str = "in-memory",
                 out_dir: str | Path | None = None, device: str | None = None, progress: bool = True) -> dict:
    """mIoU, per-class IoU and pixel accuracy of a head + backbone on ``ds``; writes results.json and
    confusion_matrix.png into ``out_dir``."""
    if ds.classes != ckpt.classes and ds.num_classes == ckpt.num_classes:
        log.warning("class names differ between the head (%s...) and %s (%s...): matching by index",
                    ckpt.classes[:3], ds.name, ds.classes[:3])
    segmenter, dev = build_segmenter(model, ckpt, device)
    resize = Resize(short_side, segmenter.patch_size, round_to_patch)
    t0 = time.perf_counter()
    scores, cm = evaluate(segmenter, ds, resize, inference, device=dev, progress=progress)
    res = {"task": "seg-eval", "model": model_id, "head": ckpt.source, "data": _described(ds),
           "preprocessing": {"short_side": short_side, "round_to_patch": round_to_patch},
           "inference": inference.as_dict(), **_named(scores, ds.classes),
           "headline": {"metric": "mIoU", "value": json_safe(scores["miou"])},
           "wall_s": {"eval": time.perf_counter() - t0}}
    if out_dir is not None:
        _write_scores(Path(out_dir), res, cm, ds.classes, f"mIoU {scores['miou']:.2f}")
    return res


def _pct(v: float | None, width: int = 0) -> str:
    return f"{v:{width}.2f}" if v is not None else f"{'n/a':>{width}s}"


def format_table(res: dict, top: int = 12) -> str:
    """Text summary printed by ``dinolab seg train|eval`` (n/a: a class absent from the split)."""
    lines = [(f"{res['task']} | model {res['model']} | mIoU {_pct(res['miou'])} | pixel acc {_pct(res['pixel_acc'])} "
              f"| mAcc {_pct(res['macc'])}")]
    ious = res["per_class_iou"]
    for name, v in list(ious.items())[:top]:
        lines.append(f"  {name[:20]:20s} IoU {_pct(v, 6)}")
    if len(ious) > top:
        lines.append(f"  ... {len(ious) - top} more classes in results.json")
    return "\n".join(lines)
