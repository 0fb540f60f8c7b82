"""Embed a folder of images to disk, resumably.

``embed`` is the ``dinolab embed`` job: it writes
features shard by shard (each shard atomically), so a killed run resumes where it stopped, then
merges the shards into final files and removes them. Output folder of ``embed``::

    cls.npy / patch_mean.npy / registers.npy   float32 (N, D) / (N, D) / (N, R, D)   (fmt="npy")
    features.safetensors                       the same tensors in one file           (fmt="safetensors")
    ids.txt        one id per line, same row order as the arrays
    skipped.txt    "<id>\\t<reason>" per image that could not be decoded
    meta.json      model, dims, counts, pooling, transform, version, time (written last: the run is done)
    run.json       the settings that a resumed run must match: model id and options, a SHA-256 of the
                   weights, pooling, transform, precision, shard size and the image list
    shards/        per-shard features (.npz) and ids (.json) while the run is in progress

Every input id appears in exactly one of ids.txt and skipped.txt. ``transform`` is a dict
(``resize``, ``crop``, ``interpolation``, ``mean``, ``std`` and the ``steps``; see
``dinolab.data.transforms.describe_transform``); older folders hold its repr text, which readers still
accept. A model whose weights or features are not finite (NaN / inf) is refused. ``meta.json`` also records
``id_root``, the folder the ids are relative to (the image folder, the list file's folder, or the
working directory for image paths given one by one), so later stages can find the files.

Under ``torchrun`` (a process group initialised with ``dinolab.distributed.init_distributed``) the
shards still to do are dealt round-robin to the ranks; rank 0 merges them when all are written.
Batches never cross a shard boundary, so every image is embedded in the same batch as in one
process and the files are the same as a single-process run's (bit-identical on the same hardware).
The output folder must be visible to all ranks (one node, or a shared file system).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinolab.data.images import Batch, ImageListDataset, ImageSource, list_images_with_ids
from dinolab.data.transforms import describe_transform, make_classification_transform
from dinolab.distributed import all_gather_objects, barrier, get_rank, get_world_size, is_distributed
from dinolab.errors import DinolabError
from dinolab.eval.features import (
    FORMATS,
    POOLINGS,
    Transform,
    _check_pooling,
    _empty,
    _forward_batches,
    _frozen,
    _loader,
    _log_skipped,
    _precision,
)
from dinolab.io import atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class EmbedResult:
    """What ``embed`` wrote: ``count`` rows, ``skipped`` (id, reason), the final ``files``, and how
    many shards were reused from an earlier run versus computed now."""

    out_dir: Path
    count: int
    skipped: list[tuple[str, str]]
    files: list[str]
    shards_reused: int = 0
    shards_computed: int = 0


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="surrogateescape")


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite_weights(model: nn.Module, model_id: str) -> None:
    """Refuse a model with NaN / inf weights (its features would all be NaN)."""
    bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
               None)
    if bad is not None:
        raise DinolabError(f"model {model_id} has non-finite weights (NaN or inf) in {bad}: the checkpoint is "
                           "broken (a diverged training run?); embed with another one")


def _run_settings(model_id: str, keys: Sequence[str], transform: Transform, shard_size: int,
                  dtype: torch.dtype | None, ids: list[str], model: nn.Module, model_key: dict | None) -> dict:
    """What a resumed run must share with the run that wrote the shards."""
    digest = hashlib.sha256("\n".join(ids).encode("utf-8", errors="surrogateescape")).hexdigest()
    return {
        "model_id": model_id, "model_options": dict(model_key or {}), "weights_sha256": weights_sha256(model),
        "pooling": list(keys), "shard_size": shard_size, "inputs": len(ids),
        "ids_sha256": digest, "autocast": str(dtype).removeprefix("torch.") if dtype else None,
        "transform": describe_transform(transform),
    }


_OUR_FILES = ("run.json", "meta.json", "ids.txt", "skipped.txt", "features.safetensors",
              *(f"{k}.npy" for k in POOLINGS))


def _prepare_out_dir(out: Path, run: dict, overwrite: bool) -> bool:
    """Create/validate ``out``; True when it already holds this finished run."""
    if overwrite:
        shutil.rmtree(out / "shards", ignore_errors=True)
        for name in _OUR_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run.json").exists():
        if any(out.iterdir()) and not overwrite:
            raise DinolabError(f"output folder {out} is not empty and holds no embed run; use a new folder "
                               "or --overwrite")
        atomic_write_json(out / "run.json", run)
        return False
    old = _read_json(out / "run.json")
    if old != run:
        diff = sorted(k for k in run.keys() | old.keys() if run.get(k) != old.get(k))
        raise DinolabError(f"{out} holds an embed run with another model, settings or images ({', '.join(diff)} "
                           "differ): resuming would mix them; use a new output folder or --overwrite")
    meta = out / "meta.json"
    if meta.exists() and all((out / f).exists() for f in _read_json(meta)["files"]):
        return True
    meta.unlink(missing_ok=True)
    return False


def _shard_done(out: Path, k: int, inputs: list[str]) -> bool:
    marker = out / "shards" / f"{k:05d}.json"
    if not marker.exists():
        return False
    if json.loads(_read_text(marker))["inputs"] != inputs:
        raise DinolabError(f"shard {marker} was written for other images; the image list changed: "
                           "use a new output folder or --overwrite")
    return (out / "shards" / f"{k:05d}.npz").exists()


def _write_shard(out: Path, k: int, inputs: list[str], ok: list[str], skipped: list, arrays: dict) -> None:
    """Features first, then the id file, which marks the shard complete."""
    atomic_write(out / "shards" / f"{k:05d}.npz", lambda f: np.savez(f, **arrays))
    marker = {"inputs": inputs, "ok": ok, "skipped": skipped}
    atomic_write_json(out / "shards" / f"{k:05d}.json", marker)


def _finite_rows(v: Tensor) -> list[bool]:
    """Per row of (B, ...) features: all values finite."""
    return torch.isfinite(v.reshape(len(v), -1)).all(dim=1).tolist()


class _ShardBuffer:
    """Collects the batches of one shard; batches never cross a shard boundary."""

    def __init__(self, empty: dict[str, Tensor]) -> None:
        self.empty, self.ok, self.skipped, self.seen = empty, [], [], 0
        self.rows: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, batch: Batch, feats: dict[str, Tensor], ids: list[str], model_id: str) -> None:
        finite = [all(row) for row in zip(*(_finite_rows(v) for v in feats.values()))]  # per image, every key
        bad = [ids[i] for i, ok in zip(batch.indices, finite) if not ok]
        if bad:
            raise DinolabError(f"model {model_id} gives non-finite features (NaN or inf) for {len(bad)} image(s), "
                               f"e.g. {', '.join(bad[:3])}: broken weights, or an overflow under --precision fp16 "
                               "(try fp32 / bf16)")
        self.ok += [ids[i] for i in batch.indices]
        self.skipped += [[ids[i], reason] for i, reason in batch.skipped]
        self.seen += len(batch.indices) + len(batch.skipped)
        for key, v in feats.items():
            self.rows[key].append(v)

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: torch.cat(self.rows[key] or [e]).numpy() for key, e in self.empty.items()}


def _compute_shards(
    model: nn.Module, dataset: ImageListDataset, ids: list[str], todo: list[int], out: Path, *,
    shard_size: int, batch_size: int, num_workers: int, device: torch.device, dtype: torch.dtype | None,
    keys: Sequence[str], progress: bool, model_id: str,
) -> None:
    """Run the shards in ``todo``, writing each one as soon as its last batch is done."""
    spans = {k: range(k * shard_size, min((k + 1) * shard_size, len(ids))) for k in todo}
    batches = [list(r[j:j + batch_size]) for r in spans.values() for j in range(0, len(r), batch_size)]
    (out / "shards").mkdir(exist_ok=True)
    buf = _ShardBuffer(_empty(model, keys))
    total = sum(len(r) for r in spans.values())
    show = progress and get_rank() == 0
    with _frozen(model.to(device)), tqdm(total=total, disable=not show, unit="img", desc="embed") as bar:
        loader = _loader(dataset, batches, num_workers, device)
        for batch, feats in _forward_batches(model, loader, device=device, dtype=dtype, keys=keys, bar=bar):
            buf.add(batch, feats, ids, model_id)
            k = (batch.indices or [batch.skipped[0][0]])[0] // shard_size
            if buf.seen == len(spans[k]):
                _write_shard(out, k, [ids[i] for i in spans[k]], buf.ok, buf.skipped, buf.arrays())
                buf = _ShardBuffer(buf.empty)


def _shard_blocks(out: Path, n_shards: int, key: str) -> Iterator[np.ndarray]:
    """The ``key`` array of each shard in order, one shard in memory at a time."""
    for k in range(n_shards):
        with np.load(out / "shards" / f"{k:05d}.npz") as d:
            yield d[key]


def _save_npy(path: Path, shape: tuple[int, ...], blocks: Iterator[np.ndarray]) -> None:
    """Stream ``blocks`` into a memory-mapped .npy (no second copy in RAM), then rename into place.
    The file's blocks are reserved first, so a full disk raises ``OSError`` (ENOSPC) here instead of
    killing the process with SIGBUS when a write through the memory map finds no space."""
    tmp = path.with_name(path.name + ".tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    try:
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot: go on
            del arr
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from None
    start = 0
    for block in blocks:
        arr[start:start + len(block)] = block
        start += len(block)
    arr.flush()
    del arr
    os.replace(tmp, path)


def _merge(out: Path, n_shards: int, keys: Sequence[str], fmt: str) -> tuple[list[str], list, dict]:
    """Concatenate the shards into the final files; returns (ids, skipped, shapes)."""
    shard_meta = [json.loads(_read_text(out / "shards" / f"{k:05d}.json")) for k in range(n_shards)]
    ok = [i for m in shard_meta for i in m["ok"]]
    skipped = [tuple(s) for m in shard_meta for s in m["skipped"]]
    with np.load(out / "shards" / "00000.npz") as d:
        shapes = {key: (len(ok), *d[key].shape[1:]) for key in keys}
    if fmt == "npy":
        for key in keys:
            _save_npy(out / f"{key}.npy", shapes[key], _shard_blocks(out, n_shards, key))
    else:  # safetensors writes from memory: the whole array is held once
        from safetensors.numpy import save

        arrays = {key: np.concatenate(list(_shard_blocks(out, n_shards, key))) for key in keys}
        atomic_write(out / "features.safetensors", lambda f: f.write(save(arrays)))
    atomic_write_text(out / "ids.txt", "".join(f"{i}\n" for i in ok))
    atomic_write_text(out / "skipped.txt", "".join(f"{i}\t{r}\n" for i, r in skipped))
    return ok, skipped, shapes


def _check_ids(ids: list[str]) -> None:
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise DinolabError(f"image id {bad!r} contains a line break, which ids.txt cannot hold; "
                           "rename the file")


def _id_root(images: ImageSource) -> str:
    """The folder ids are relative to: the folder itself, a list file's folder, else the working directory."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            return str(path.resolve())
        if path.suffix.lower() == ".txt":
            return str(path.resolve().parent)
    return os.getcwd()


def _on_rank0(fn, *args):
    """Run ``fn`` on rank 0 only and give every rank its result (or its error, raised everywhere)."""
    if not is_distributed():
        return fn(*args)
    out: tuple = (None, None)
    if get_rank() == 0:
        try:
            out = (fn(*args), None)
        except DinolabError as e:
            out = (None, str(e))
    value, error = all_gather_objects(out)[0]
    if error is not None:
        raise DinolabError(error)
    return value


def embed(
    model: nn.Module,
    images: ImageSource,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    transform: Transform | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    autocast: torch.dtype | bool | None = None,
    pooling: str | Sequence[str] = ("cls",),
    fmt: str = "npy",
    shard_size: int = 4096,
    overwrite: bool = False,
    progress: bool = True,
    model_key: dict | None = None,
) -> EmbedResult:
    """Embed ``images`` (folder, ``.txt`` list file or list of paths) into ``out_dir`` (layout in the
    module docstring); resumable: re-running the same call skips the shards already written.

    ``model_id`` is recorded in meta.json (e.g. the name or path given to ``load_model``);
    ``model_key`` (the options that chose the weights) and a SHA-256 of the weights join the run key,
    so a resumed run with another model, checkpoint content or options is refused.
    ``num_workers`` None = min(8, CPU count). ``fmt`` is "npy" or "safetensors". ``overwrite``
    deletes an earlier run's files in ``out_dir`` first. Other arguments as ``extract_features``.
    Raises ``DinolabError`` if ``out_dir`` holds a run with other images, weights or settings, or
    if the weights or features are not finite.
    """
    keys = _check_pooling(model, pooling)
    check_finite_weights(model, model_id)
    if fmt not in FORMATS or shard_size < 1 or batch_size < 1:
        raise DinolabError(f"need fmt in {FORMATS}, shard_size >= 1, batch_size >= 1 (got {fmt!r}, "
                           f"{shard_size}, {batch_size})")
    paths, ids = list_images_with_ids(images)
    _check_ids(ids)
    transform = transform or make_classification_transform()
    device, dtype = _precision(device, autocast)
    out = Path(out_dir)
    run = _run_settings(model_id, keys, transform, shard_size, dtype, ids, model, model_key)
    n_shards = -(-len(ids) // shard_size)
    if _on_rank0(_prepare_out_dir, out, run, overwrite):
        logger.info("%s already holds this finished embed run; nothing to do", out)
        return _result(out, n_shards, 0)
    todo = [k for k in range(n_shards) if not _shard_done(out, k, ids[k * shard_size:(k + 1) * shard_size])]
    if len(todo) < n_shards and get_rank() == 0:
        logger.info("resuming in %s: %d of %d shards already done", out, n_shards - len(todo), n_shards)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    mine = todo[get_rank()::get_world_size()] if is_distributed() else todo
    _compute_shards(model, ImageListDataset(paths, transform), ids, mine, out, shard_size=shard_size,
                    batch_size=batch_size, num_workers=workers, device=device, dtype=dtype, keys=keys,
                    progress=progress, model_id=model_id)
    barrier()  # every shard is on disk
    _on_rank0(_finish, out, n_shards, keys, fmt, run, len(ids), _id_root(images))
    return _result(out, n_shards - len(todo), len(todo))


def _finish(out: Path, n_shards: int, keys: Sequence[str], fmt: str, run: dict, n_inputs: int,
            id_root: str) -> None:
    """Merge the shards into the final files and write meta.json, which marks the run finished."""
    ok, skipped, shapes = _merge(out, n_shards, keys, fmt)
    arrays = [f"{k}.npy" for k in keys] if fmt == "npy" else ["features.safetensors"]
    files = ["ids.txt", "skipped.txt", *arrays]
    from dinolab import __version__

    meta = {**run, "format": fmt, "files": files, "count": len(ok), "skipped": len(skipped),
            "dims": {k: list(s) for k, s in shapes.items()}, "id_root": id_root, "dinolab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out / "meta.json", meta)  # last: marks the run finished
    shutil.rmtree(out / "shards", ignore_errors=True)
    _log_skipped(skipped, n_inputs)
    logger.info("embedded %d images into %s (%d skipped, listed in skipped.txt)", len(ok), out, len(skipped))


def _result(out: Path, reused: int, computed: int) -> EmbedResult:
    meta = json.loads(_read_text(out / "meta.json"))
    skipped = [tuple(ln.rsplit("\t", 1)) for ln in _read_text(out / "skipped.txt").splitlines()]
    return EmbedResult(out, meta["count"], skipped, meta["files"], reused, computed)


def load_embeddings(
    out_dir: str | os.PathLike, *, mmap: bool = False
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read a finished ``embed`` folder: (ids, {"cls": (N, D), ...}) with rows in ids order.
    ``mmap=True`` memory-maps .npy files instead of reading them."""
    ids, arrays, _ = read_embed_folder(out_dir, mmap)
    return ids, arrays


def load_embedded(
    embed_dir: str | os.PathLike, key: str = "cls", *, mmap: bool = True
) -> tuple[list[str], np.ndarray, dict]:
    """(ids, the ``key`` features (N, D), meta.json) of a finished ``embed`` folder that holds at least
    one image; clear errors for a missing pooling key or an empty run."""
    ids, arrays, meta = read_embed_folder(embed_dir, mmap)
    if key not in arrays:
        raise DinolabError(f"{embed_dir} has no '{key}' features (has {sorted(arrays)}); embed with --pooling {key}")
    if not ids:
        raise DinolabError(f"{embed_dir} holds no embedded images (all skipped?); see its skipped.txt")
    return ids, arrays[key], meta


def _read_json(path: Path) -> dict:
    try:
        return json.loads(_read_text(path))
    except (ValueError, UnicodeError) as e:
        raise DinolabError(f"{path} is not valid JSON ({e}): the embed folder is damaged; re-run dinolab embed "
                           "with --overwrite") from None


def read_embed_folder(out_dir: str | os.PathLike, mmap: bool = False) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """``load_embeddings`` plus the folder's meta.json: (ids, arrays, meta). A damaged file raises
    ``DinolabError`` naming it."""
    out = Path(out_dir)
    if not (out / "meta.json").exists():
        raise DinolabError(f"{out} holds no finished embed run (no meta.json); run or resume dinolab embed")
    meta = _read_json(out / "meta.json")
    ids = _read_text(out / "ids.txt").splitlines()
    fmt = meta.get("format")
    files = [out / "features.safetensors"] if fmt == "safetensors" else [out / f"{k}.npy" for k in meta["pooling"]]
    try:
        if fmt == "safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(files[0]))
        else:
            arrays = {k: np.load(f, mmap_mode="r" if mmap else None) for k, f in zip(meta["pooling"], files)}
    except Exception as e:
        raise DinolabError(f"cannot read the features in {', '.join(map(str, files))}: {' '.join(str(e).split())}; "
                           "re-run dinolab embed with --overwrite") from e
    if any(len(a) != len(ids) for a in arrays.values()):
        raise DinolabError(f"{out}: arrays and ids.txt disagree in length; "
                           "re-run dinolab embed with --overwrite")
    return ids, arrays, meta
