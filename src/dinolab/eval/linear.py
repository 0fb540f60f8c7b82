"""Linear probe of a frozen backbone: the DINOv2 linear-evaluation protocol on labelled images.

What follows the official ``dinov2/eval/linear.py``:

- one frozen-backbone pass per batch (``get_intermediate_layers(x, n=max(n_blocks),
  return_class_token=True)``) feeds a grid of linear heads trained together: learning rates
  (default ``DEFAULT_LRS``, per 256 images, scaled by ``batch_size / 256``) x ``n_blocks``
  (CLS tokens of the last n blocks concatenated) x ``avgpool`` (also the last block's patch mean);
- each head: ``nn.Linear``, weight N(0, 0.01), bias 0, SGD momentum 0.9, no weight decay, cosine
  learning rate to 0 over all iterations, cross-entropy (see ``dinolab.eval.linear_grid``);
- training images: RandomResizedCrop(crop) (scale 0.08-1, bicubic) + horizontal flip + ImageNet
  normalisation; evaluation images: resize the short side to ``resize`` + centre crop ``crop``.

What differs, and why:

- an epoch is one pass over the training images (the release uses 1250 iterations of 128 per
  "epoch", whatever the data set);
- ``augment=False`` runs the backbone once over the training images (evaluation transform), keeps
  the last ``max(n_blocks)`` CLS tokens and the patch mean in memory (CPU float32, N x (K+1) x D),
  and trains on those for all epochs: far faster, a little less accurate;
- two selections are reported. The release picks the head with the best accuracy on the evaluation
  set itself (``official``, kept for comparability: it is tuned on the test labels). ``held_out``
  (the headline) carves a stratified ``val_fraction`` of the training set, trains the grid on the
  rest, picks the head with the best validation top-1 (ties: lower validation loss, then grid
  order) and reports that one head on the test set once. Both come from the same grid, so the
  ``official`` heads saw ``val_fraction`` less training data than the release's do.

Accuracies are percentages. Images that cannot be decoded are skipped with a warning; test
accuracies are over the decoded test images, and their predictions are -1.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from dinolab.data.datasets import LabeledImages, stratified_split
from dinolab.data.images import ImageListDataset
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_classification_transform
from dinolab.errors import DinolabError
from dinolab.eval.features import _frozen, _loader, _log_skipped, _precision
from dinolab.eval.linear_grid import (
    DEFAULT_LRS,
    GridOutcome,
    GridTrainer,
    build_grid,
    evaluate_sets,
    make_configs,
    train_linear_grid,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LRS", "LinearResult", "linear_probe", "make_linear_train_transform"]


@dataclass
class LinearResult:
    """Outcome of ``linear_probe`` (accuracies in %).

    Attributes:
        grid: one dict per head: base_lr, lr (used), n_blocks, avgpool, val_top1, val_loss,
            test_top1, test_top5.
        held_out: the head chosen on the validation split, with its test top1/top5 (the headline).
        official: the head with the best test top-1 (the release's selection), with its top1/top5.
        test_predictions: (N_test,) int64 predicted class of the held-out head (-1: not decoded).
        classifier_state: ``{"config", "state_dict", "classes"}`` of the held-out head, for saving.
        sizes: number of images used for fit (train minus val), val and test.
    """

    grid: list[dict]
    held_out: dict
    official: dict
    test_predictions: Tensor
    classifier_state: dict
    sizes: dict[str, int]


def make_linear_train_transform(crop: int = 224) -> v2.Compose:
    """Official linear-probe training augmentation: random resized crop, flip, normalise."""
    return v2.Compose([
        v2.RandomResizedCrop(crop, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass
class _Backbone:
    """The frozen model and how to run it."""

    model: nn.Module
    n_max: int
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    num_workers: int
    progress: bool

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {"cls": (B, n_max, D), "patch_mean": (B, D)} float32 on the device."""
        with _frozen(self.model), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            x = images.to(self.device, non_blocking=True)
            outs = self.model.get_intermediate_layers(x, n=self.n_max, return_class_token=True)
            cls = torch.stack([c for _, c in outs], dim=1).float()  # (B, n_max, D), last block last
            patch_mean = outs[-1][0].float().mean(dim=1)  # (B, D)
        # clone outside inference mode: inference tensors cannot be saved for the heads' backward
        return {"cls": cls.clone(), "patch_mean": patch_mean.clone()}

    def loader(self, ds: LabeledImages, transform: v2.Compose, order: Tensor | None = None) -> DataLoader:
        """Batches of ``ds`` in ``order`` (default: dataset order) through the bad-image-tolerant loader."""
        order = torch.arange(len(ds)) if order is None else order
        batches = [b.tolist() for b in order.split(self.batch_size)]
        return _loader(ImageListDataset(ds.items, transform), batches, self.num_workers, self.device)


def _extract(bb: _Backbone, ds: LabeledImages, transform: v2.Compose, name: str
             ) -> tuple[dict[str, Tensor], Tensor, list[int]]:
    """Features (CPU float32) and labels of the decodable images of ``ds``, and their indices."""
    rows: dict[str, list[Tensor]] = defaultdict(list)
    good: list[int] = []
    skipped: list[tuple[str, str]] = []
    for batch in tqdm(bb.loader(ds, transform), disable=not bb.progress, desc=f"features {name}", unit="batch"):
        skipped += [(ds.ids[i], reason) for i, reason in batch.skipped]
        if batch.images is None:
            continue
        good += batch.indices
        for k, v in bb.features(batch.images).items():
            rows[k].append(v.cpu())
    _log_skipped(skipped, len(ds))
    if not good:
        raise DinolabError(f"none of the {len(ds)} {name} images could be decoded")
    labels = torch.as_tensor(np.asarray(ds.labels)[good], dtype=torch.long)
    return {k: torch.cat(v) for k, v in rows.items()}, labels, good


def _split(train: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """(fit, val): the stratified split of ``dinolab.data.datasets``, checked for use here."""
    fit, val = stratified_split(train, fraction, seed)
    if len(val) == 0:
        raise DinolabError(f"val_fraction {fraction} leaves no validation images (classes too small); "
                           "raise val_fraction or add training images")
    lost = sorted(set(np.unique(train.labels).tolist()) - set(np.unique(fit.labels).tolist()))
    if lost:
        logger.warning("classes %s have no training image left after the validation split", lost)
    return fit, val


def _check_inputs(model: nn.Module, train: LabeledImages, test: LabeledImages,
                  n_blocks: Sequence[int], val_fraction: float, epochs: int) -> int:
    """Raise ``DinolabError`` on unusable inputs; return the number of classes."""
    if not callable(getattr(model, "get_intermediate_layers", None)):
        raise DinolabError(f"{type(model).__name__} has no get_intermediate_layers(); "
                           "pass a dinolab backbone (dinolab.load_model or create_model)")
    depth = len(getattr(model, "blocks", ()))
    if depth and n_blocks and max(n_blocks) > depth:
        raise DinolabError(f"n_blocks {tuple(n_blocks)} asks for more blocks than the model's depth {depth}")
    if len(test) == 0:
        raise DinolabError("the test set is empty")
    if len(np.unique(train.labels)) < 2:
        raise DinolabError(f"the training set needs >= 2 classes, it has {len(np.unique(train.labels))}")
    if not 0.0 < val_fraction < 1.0 or epochs < 1:
        raise DinolabError(f"val_fraction must be in (0, 1) and epochs >= 1, got {val_fraction}, {epochs}")
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        raise DinolabError("train and test sets have different class lists; labels would not match")
    num_classes = len(train.classes) or int(np.max(train.labels)) + 1
    for name, labels in (("train", train.labels), ("test", test.labels)):
        if int(np.min(labels)) < 0 or int(np.max(labels)) >= num_classes:
            raise DinolabError(f"{name} labels must lie in [0, {num_classes})")
    return num_classes


def _train_augmented(bb: _Backbone, fit: LabeledImages, eval_sets: dict, num_classes: int,
                     configs: list, *, epochs: int, crop: int, seed: int) -> GridOutcome:
    """Train the grid on freshly augmented training images every epoch (backbone run per batch)."""
    grid = build_grid(configs, eval_sets["val"][0]["cls"].shape[-1], num_classes, bb.device, seed)
    labels = torch.as_tensor(np.asarray(fit.labels), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + 1)
    steps = -(-len(fit) // bb.batch_size)
    trainer = GridTrainer(grid, epochs * steps)
    transform = make_linear_train_transform(crop)
    skipped = 0
    with tqdm(total=trainer.total_steps, disable=not bb.progress, desc="linear grid", unit="step") as bar:
        for _ in range(epochs):
            for batch in bb.loader(fit, transform, torch.randperm(len(fit), generator=gen)):
                skipped += len(batch.skipped)
                if batch.images is not None:
                    trainer.step(bb.features(batch.images), labels[batch.indices].to(bb.device))
                else:
                    trainer.steps += 1  # keep the schedule aligned when a whole batch is undecodable
                bar.update()
    if skipped:
        logger.warning("skipped %d of %d training images that could not be decoded", skipped // epochs, len(fit))
    return evaluate_sets(grid, eval_sets)


def _pick(rows: list[dict], best: int, selection: str) -> dict:
    keys = ("base_lr", "lr", "n_blocks", "avgpool", "val_top1", "test_top1", "test_top5")
    return {"selection": selection, **{k: rows[best][k] for k in keys}}


def _summarise(outcome: GridOutcome, n_test: int, test_good: list[int], classes: list[str],
               sizes: dict[str, int]) -> LinearResult:
    """Grid table, both selections, predictions and state of the held-out head."""
    val, test = outcome.metrics["val"], outcome.metrics["test"]
    rows = [{**c.as_dict(), "val_top1": v["top1"], "val_loss": v["loss"], "test_top1": t["top1"],
             "test_top5": t["top5"]} for c, v, t in zip(outcome.grid.configs, val, test)]
    held = max(range(len(rows)), key=lambda i: (rows[i]["val_top1"], -rows[i]["val_loss"]))  # first max wins
    best = max(range(len(rows)), key=lambda i: rows[i]["test_top1"])
    predictions = torch.full((n_test,), -1, dtype=torch.long)
    predictions[torch.as_tensor(test_good, dtype=torch.long)] = outcome.predictions["test"][:, held]
    head = outcome.grid.heads[held]
    state = {"config": {**outcome.grid.configs[held].as_dict(), "in_features": head.in_features,
                        "num_classes": head.out_features},
             "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
             "classes": list(classes)}
    held_out, official = _pick(rows, held, "held-out"), _pick(rows, best, "official")
    logger.info("linear probe: held-out %s -> test top1 %.2f; official (best on test) %.2f",
                {k: held_out[k] for k in ("lr", "n_blocks", "avgpool")}, held_out["test_top1"], official["test_top1"])
    return LinearResult(rows, held_out, official, predictions, state, sizes)


def linear_probe(
    model: nn.Module,
    train: LabeledImages,
    test: LabeledImages,
    *,
    lrs: Sequence[float] | None = None,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    epochs: int = 10,
    batch_size: int = 256,
    augment: bool = True,
    resize: int = 256,
    crop: int = 224,
    val_fraction: float = 0.1,
    device: str | torch.device | None = None,
    autocast: torch.dtype | bool | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> LinearResult:
    """DINOv2 linear probe of the frozen ``model`` (see the module docstring for the protocol).

    ``lrs`` are per 256 images (default the official 13) and scaled by ``batch_size / 256``.
    For 32-px images and a patch-4/8 model use ``resize=32, crop=32``. ``autocast``: None = bf16
    on CUDA, fp32 on CPU. Deterministic for a given ``seed`` on CPU (the global RNG, used by the
    augmentations, is forked and seeded, then restored).
    """
    configs = make_configs(lrs, n_blocks, avgpool, batch_size)  # checks lrs, n_blocks, avgpool first
    num_classes = _check_inputs(model, train, test, n_blocks, val_fraction, epochs)
    device, dtype = _precision(device, autocast)
    bb = _Backbone(model.to(device), max(n_blocks), device, dtype, batch_size, num_workers, progress)
    fit, val = _split(train, val_fraction, seed)
    eval_tf = make_classification_transform(resize, crop)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        val_f, val_y, _ = _extract(bb, val, eval_tf, "val")
        test_f, test_y, test_good = _extract(bb, test, eval_tf, "test")
        eval_sets = {"val": (val_f, val_y), "test": (test_f, test_y)}
        if augment:
            outcome = _train_augmented(bb, fit, eval_sets, num_classes, configs,
                                       epochs=epochs, crop=crop, seed=seed)
        else:
            fit_f, fit_y, _ = _extract(bb, fit, eval_tf, "train")
            outcome = train_linear_grid(fit_f, fit_y, eval_sets, num_classes=num_classes, lrs=lrs,
                                        n_blocks=n_blocks, avgpool=avgpool, epochs=epochs,
                                        batch_size=batch_size, device=device, seed=seed, progress=progress)
    sizes = {"fit": len(fit), "val": len(val), "test": len(test)}
    return _summarise(outcome, len(test), test_good, train.classes, sizes)


def extract_linear_features(model: nn.Module, ds: LabeledImages, *, n_blocks: int = 4, resize: int = 256,
                            crop: int = 224, batch_size: int = 256, device: str | torch.device | None = None,
                            autocast: torch.dtype | bool | None = None, num_workers: int = 0,
                            progress: bool = True) -> tuple[dict[str, Tensor], Tensor, list[int]]:
    """Cached linear-probe inputs of ``ds`` (evaluation transform): ``{"cls": (N, n_blocks, D),
    "patch_mean": (N, D)}``, labels (N,), and the indices of the images that decoded."""
    device, dtype = _precision(device, autocast)
    bb = _Backbone(model.to(device), n_blocks, device, dtype, batch_size, num_workers, progress)
    return _extract(bb, ds, make_classification_transform(resize, crop), "images")


def linear_probe_features(fit: tuple[dict[str, Tensor], Tensor], val: tuple[dict[str, Tensor], Tensor],
                          test: tuple[dict[str, Tensor], Tensor], *, classes: list[str], **grid_kw: Any
                          ) -> LinearResult:
    """The linear-probe grid and both selections on cached features (e.g. from
    ``extract_linear_features``, or raw pixels as ``{"cls": (N, 1, P)}`` with ``n_blocks=(1,),
    avgpool=(False,)``). ``grid_kw`` go to ``train_linear_grid``."""
    outcome = train_linear_grid(fit[0], fit[1], {"val": val, "test": test}, num_classes=len(classes), **grid_kw)
    n_test = len(test[1])
    sizes = {"fit": len(fit[1]), "val": len(val[1]), "test": n_test}
    return _summarise(outcome, n_test, list(range(n_test)), classes, sizes)
