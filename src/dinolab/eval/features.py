"""Frozen-backbone features in memory: ``extract_features`` (the on-disk job is ``dinolab.curate.embed``).

The shared batching machinery here (pooling check, precision policy, bad-image-tolerant loader)
is also what ``dinolab.curate.embed`` runs on.

Under ``torch.distributed`` (see ``dinolab.distributed``) the batches are cut exactly as in one
process and each rank takes a contiguous run of whole batches; the results are gathered so every
rank returns the full ``Features`` in dataset order. Because every batch holds the same images as in
a single-process run, the features are bit-identical to it on the same hardware and precision.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinolab.data.datasets import LabeledImages
from dinolab.data.images import Batch, ImageListDataset, ImageSource, collate_skip_bad, list_images_with_ids
from dinolab.data.transforms import make_classification_transform
from dinolab.distributed import (
    all_gather_objects,
    all_gather_uneven,
    get_rank,
    get_world_size,
    is_distributed,
)
from dinolab.errors import DinolabError

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "patch_mean", "registers")
FORMATS = ("npy", "safetensors")
Transform = Callable[[Image.Image], Tensor]
Images = ImageSource | Image.Image | Sequence[Image.Image] | np.ndarray | LabeledImages


@dataclass
class Features:
    """Features of the images that decoded; ``cls`` is always filled, the others per ``pooling``.

    Attributes:
        ids: one id per row (relative path, list-file line, path as given, or index for PIL images).
        cls: (N, D) float32 CLS token.
        patch_mean: (N, D) float32 mean of the patch tokens, or None.
        registers: (N, R, D) float32 register tokens, or None.
        skipped: (id, reason) of each image that could not be decoded.
    """

    ids: list[str]
    cls: Tensor
    patch_mean: Tensor | None = None
    registers: Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------- shared machinery


def _check_pooling(model: nn.Module, pooling: str | Sequence[str]) -> tuple[str, ...]:
    pooling = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    if not pooling or set(pooling) - set(POOLINGS):
        raise DinolabError(f"pooling must be a non-empty subset of {POOLINGS}, got {pooling}")
    if "registers" in pooling and not getattr(model, "num_register_tokens", 0):
        raise DinolabError("pooling 'registers' needs a model with register tokens (e.g. dinov2_vits14_reg)")
    return tuple(p for p in POOLINGS if p in pooling)  # canonical order, no duplicates


def _precision(
    device: str | torch.device | None, autocast: torch.dtype | bool | None
) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None): bf16 autocast by default on CUDA, fp32 elsewhere."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if autocast is None:
        autocast = device.type == "cuda"
    dtype = torch.bfloat16 if autocast is True else (autocast or None)
    return device, dtype


def _resolve(images: Images) -> tuple[list | np.ndarray, list[str]]:
    """(items for ImageListDataset, ids). An image array (N, H, W, 3) has ids "0".."N-1"."""
    if isinstance(images, LabeledImages):
        items = images.items if isinstance(images.items, np.ndarray) else list(images.items)
        return items, list(images.ids)
    if isinstance(images, np.ndarray):
        return images, [str(i) for i in range(len(images))]
    if isinstance(images, Image.Image):
        return [images], ["0"]
    if isinstance(images, (list, tuple)) and any(isinstance(i, Image.Image) for i in images):
        ids = [str(i) if isinstance(x, Image.Image) else os.fspath(x) for i, x in enumerate(images)]
        return list(images), ids
    return list_images_with_ids(images)


def _empty(model: nn.Module, keys: Sequence[str]) -> dict[str, Tensor]:
    D, R = model.embed_dim, getattr(model, "num_register_tokens", 0)
    return {k: torch.empty(0, R, D) if k == "registers" else torch.empty(0, D) for k in keys}


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the duration; the previous train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _forward_batches(
    model: nn.Module, loader: DataLoader, *, device: torch.device, dtype: torch.dtype | None,
    keys: Sequence[str], bar: tqdm,
) -> Iterator[tuple[Batch, dict[str, Tensor]]]:
    """Yield (batch, features on CPU in float32) for each batch; features are {} if all items were bad."""
    for batch in loader:
        feats: dict[str, Tensor] = {}
        if batch.images is not None:
            x = batch.images.to(device, non_blocking=True)  # (B, 3, H, W)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(x)
            pooled = {"cls": out.cls_token, "registers": out.register_tokens}  # (B, D), (B, R, D)
            if "patch_mean" in keys:
                pooled["patch_mean"] = out.patch_tokens.float().mean(dim=1)  # (B, D)
            feats = {k: pooled[k].float().cpu() for k in keys}
        bar.update(len(batch.indices) + len(batch.skipped))
        yield batch, feats


def _loader(dataset: ImageListDataset, batches: list[list[int]], num_workers: int, device: torch.device
            ) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
    )


def _log_skipped(skipped: list[tuple[str, str]], total: int) -> None:
    for i, reason in skipped:
        logger.debug("skipped %s: %s", i, reason)
    if skipped:
        examples = "; ".join(f"{i} ({r})" for i, r in skipped[:3])
        logger.warning("skipped %d of %d images that could not be decoded, e.g. %s",
                       len(skipped), total, examples)


# ---------------------------------------------------------------------------------- in memory


def _use_distributed(distributed: bool | None) -> bool:
    """Whether to shard: None = when a group of more than one process is initialised."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not initialised:
        raise DinolabError(
            "extract_features(distributed=True) needs an initialised process group: launch with "
            "torchrun and call dinolab.distributed.init_distributed() first"
        )
    return distributed is not False and is_distributed()


def _my_batches(batches: list[list[int]], shard: bool) -> list[list[int]]:
    """This rank's contiguous run of whole batches (all of them in a single process)."""
    if not shard:
        return batches
    rank, world, n = get_rank(), get_world_size(), len(batches)
    return batches[rank * n // world: (rank + 1) * n // world]


def _gather(
    good: list[int], skipped: list[tuple[int, str]], feats: dict[str, Tensor]
) -> tuple[list[int], list[tuple[int, str]], dict[str, Tensor]]:
    """Every rank's (good indices, skipped, features) merged, rows sorted by dataset index."""
    all_good = torch.cat(all_gather_uneven(torch.tensor(good, dtype=torch.int64)))
    order = torch.argsort(all_good, stable=True)  # already sorted for contiguous shards; cheap insurance
    feats = {k: torch.cat(all_gather_uneven(v))[order] for k, v in feats.items()}
    all_skipped = sorted(s for part in all_gather_objects(skipped) for s in part)
    return all_good[order].tolist(), all_skipped, feats


def extract_features(
    model: nn.Module,
    images: Images,
    *,
    transform: Transform | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    autocast: torch.dtype | bool | None = None,
    pooling: str | Sequence[str] = ("cls",),
    progress: bool = True,
    distributed: bool | None = None,
) -> Features:
    """Features of ``images`` (folder, ``.txt`` list file, list of paths, PIL images, a uint8 array
    (N, H, W, 3) with ids "0".."N-1", or a ``LabeledImages`` with its ids).

    ``transform`` defaults to the official classification preprocessing (resize 256, crop 224).
    ``pooling`` adds ``"patch_mean"`` and/or ``"registers"``; the CLS token is always returned.
    ``autocast``: None = bf16 on CUDA and fp32 on CPU, False = fp32, True = bf16, or a dtype.
    The model is moved to ``device`` and run in eval + inference mode (its mode is restored).
    Undecodable images are skipped and listed in ``Features.skipped``.
    ``distributed``: None = shard over the ranks when a process group with more than one process is
    initialised, False = every process embeds everything. When sharded, each rank embeds a
    contiguous run of whole batches and all ranks return the same, complete ``Features``
    (a collective call: every rank must call it with the same images and batch size).
    """
    keys = _check_pooling(model, ("cls", *((pooling,) if isinstance(pooling, str) else pooling)))
    items, ids = _resolve(images)
    device, dtype = _precision(device, autocast)
    shard = _use_distributed(distributed)
    dataset = ImageListDataset(items, transform or make_classification_transform())
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    mine = _my_batches(batches, shard)
    rows: dict[str, list[Tensor]] = defaultdict(list)
    good: list[int] = []
    skipped_at: list[tuple[int, str]] = []
    show = progress and (not shard or get_rank() == 0)
    with _frozen(model.to(device)), tqdm(total=sum(map(len, mine)), disable=not show, unit="img") as bar:
        loader = _loader(dataset, mine, num_workers, device)
        for batch, feats in _forward_batches(model, loader, device=device, dtype=dtype, keys=keys, bar=bar):
            good += batch.indices
            skipped_at += batch.skipped
            for k, v in feats.items():
                rows[k].append(v)
    out = {k: torch.cat(rows[k]) if rows[k] else v for k, v in _empty(model, keys).items()}
    if shard:
        good, skipped_at, out = _gather(good, skipped_at, out)
    skipped = [(ids[i], reason) for i, reason in skipped_at]
    if get_rank() == 0 or not shard:
        _log_skipped(skipped, len(items))
    return Features([ids[i] for i in good], out["cls"], out.get("patch_mean"), out.get("registers"), skipped)
