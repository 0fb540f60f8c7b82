"""Training data: any unlabelled images -> multi-crop batches, deterministic by position.

Sources: a folder (recursive), a list file, ``.tar`` shards (a shard or a folder of shards; members
read by byte offset, so no extraction and no per-worker index rebuild), or ``cifar10:train``.

Every sample's augmentation is seeded from ``(seed, epoch, index)`` and every batch's masks from its
samples' seeds, so a batch depends only on where it sits in the stream — not on worker count or
on how many batches came before. That is what makes a killed run resume exactly.
Undecodable images are skipped (counted in the batch as ``n_skipped``), never fatal; a batch of only
undecodable images comes out as ``{"n_skipped": n}`` (also from worker processes).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.collate import collate_multicrop
from dinolab.data.images import IMAGE_EXTENSIONS, BadImageError, list_images, load_rgb
from dinolab.errors import DinolabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TarMember:
    """An image stored inside an uncompressed tar shard, read by offset (no extraction)."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def tar_members(shards: Sequence[str | Path]) -> list[TarMember]:
    """Index the image members of uncompressed ``.tar`` shards (WebDataset-style), in shard order."""
    out = []
    for shard in shards:
        if str(shard).endswith((".gz", ".tgz")):
            raise DinolabError(f"{shard}: compressed tars cannot be read by offset; use uncompressed .tar "
                               "shards (tar -cf) or extract the images into a folder")
        with tarfile.open(shard, "r:") as tf:
            out += [TarMember(str(shard), m.name, m.offset_data, m.size) for m in tf.getmembers()
                    if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not out:
        raise DinolabError(f"no images found in the tar shards {list(map(str, shards))[:3]}")
    return out


def training_items(source: str) -> Sequence[str | TarMember] | np.ndarray:
    """What to train on: ``cifar10:train`` (decoded array), a ``.tar`` shard or a folder holding only
    ``.tar`` shards (images read by offset), else a folder of images (recursive) or a list file."""
    if source.startswith("cifar10:"):
        from dinolab.data.datasets import load_cifar10

        return load_cifar10(source.split(":", 1)[1]).items
    path = Path(source)
    if path.suffix == ".tar":
        return tar_members([path])
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and all(p.suffix == ".tar" for p in path.iterdir() if p.is_file()):
            return tar_members(shards)
    return list_images(source)


def _decode(item: str | TarMember | np.ndarray) -> Image.Image:
    """PIL RGB image of one training item; ``BadImageError`` when it cannot be decoded."""
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    if isinstance(item, TarMember):  # decoded as a file is (EXIF orientation applied, alpha on white ...)
        label = f"{item.shard}::{item.name}"
        try:
            data = item.read()
        except OSError as e:
            raise BadImageError(label, f"{type(e).__name__}: {e}") from e
        return load_rgb(io.BytesIO(data), name=label)
    return load_rgb(item)


class StreamSampler(Sampler[tuple[int, int]]):
    """Endless ``(index, sample_seed)`` stream: a fresh permutation per epoch, this rank's share of
    it (strided), starting ``start`` samples into this rank's stream."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if n < world_size:
            raise DinolabError(f"{n} training images cannot be shared by {world_size} processes")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.n // self.world  # equal shares keep the ranks in step; the rest waits an epoch
        epoch, offset = divmod(self.start, per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank::self.world][:per_rank].tolist()
            for pos in range(offset, per_rank):
                yield order[pos], (self.seed * 1_000_003 + epoch) * 10_000_019 + order[pos]
            epoch, offset = epoch + 1, 0


class MultiCropDataset(Dataset):
    """``(index, sample_seed)`` -> ``(index, seed, crops dict)`` or ``(index, seed, None)`` if bad."""

    def __init__(self, items: Sequence[str] | np.ndarray, augment: MultiCropAugmentation) -> None:
        self.items, self.augment = items, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        item = self.items[index]
        try:
            img = _decode(item)
        except BadImageError as e:
            log.debug("skipping %s", e)
            return index, seed, None
        with torch.random.fork_rng(devices=[]):  # seeded per sample, caller's RNG untouched
            torch.manual_seed(seed % 2**63)
            return index, seed, self.augment(img)


def collate_stream(samples, *, grid: tuple[int, int], mask_probability: float, mask_ratio: tuple[float, float]):
    """Drop bad samples, seed the masks from the samples' seeds, collate the rest. A batch without
    one decodable image is only ``{"n_skipped": n}`` (the training loop skips that step and counts it)."""
    good = [(i, crops) for i, _, crops in samples if crops is not None]
    if not good:
        return {"n_skipped": len(samples)}
    digest = hashlib.sha256(",".join(str(s) for _, s, _ in samples).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    batch = collate_multicrop(good, grid=grid, mask_probability=mask_probability, mask_ratio=mask_ratio, rng=rng)
    batch["n_skipped"] = len(samples) - len(good)
    return batch


def make_loader(items: Sequence[str] | np.ndarray, augment: MultiCropAugmentation, *, batch_size: int,
                grid: tuple[int, int], mask_probability: float, mask_ratio: tuple[float, float], seed: int,
                start: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, start_sample: int | None = None) -> Iterator[dict]:
    """An endless iterator of training batches starting ``start`` batches (or, when given,
    ``start_sample`` samples) into this rank's stream."""
    position = start * batch_size if start_sample is None else start_sample
    sampler = StreamSampler(len(items), seed=seed, rank=rank, world_size=world_size, start=position)
    collate = partial(collate_stream, grid=grid, mask_probability=mask_probability, mask_ratio=mask_ratio)
    loader = DataLoader(MultiCropDataset(items, augment), sampler=sampler, batch_size=batch_size,
                        collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone
    return iter(loader)
