"""Exact cosine retrieval in torch, plus label-based retrieval metrics.

``ExactIndex`` holds L2-normalised features (N, D), one id per row and the id of the model that
produced them. ``search`` is brute force but chunked over queries *and* database rows with a
running top-k merge, so memory is O(query_chunk x db_chunk), never O(M x N): a 1M-vector database
does not need an M x N similarity matrix. It runs on the GPU when built with ``device="cuda"``.

Approximate indexes (faiss flat / IVF / HNSW / IVF-PQ) sit beside it in ``curate.faiss_index`` with
the same ``search`` / ``vectors`` / ``save`` / ``load`` shape; ``make_index`` builds either kind
(``"auto"`` chooses by size) and ``load_index`` opens either folder.

Folder written by ``ExactIndex.save``::

    features.npy   float32 (N, D), rows L2-normalised
    ids.txt        one id per line, same row order
    meta.json      {"format", "version", "model_id", "dim", "count", "info"} (written last: the index is complete)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from dinolab.errors import DinolabError
from dinolab.eval.neighbours import topk_cosine
from dinolab.io import atomic_write, atomic_write_json, atomic_write_text, read_json_object

__all__ = [
    "ExactIndex",
    "Index",
    "average_precision",
    "load_index",
    "make_index",
    "mean_average_precision",
    "query_transform",
    "recall_at_k",
    "topk_cosine",
]

FORMAT = "dinolab-exact-index"
VERSION = 1
DEFAULT_QUERY_TRANSFORM = (256, 224)  # dinolab embed's default resize / crop

log = logging.getLogger(__name__)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.float()


def _normalize(x: np.ndarray | torch.Tensor, name: str = "features") -> torch.Tensor:
    t = _as_tensor(x)
    if t.ndim != 2:
        raise DinolabError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    return F.normalize(t, dim=-1)


class ExactIndex:
    """Brute-force cosine index over ``features`` (N, D), L2-normalised on construction.

    ``ids`` name the rows (default ``"0".."N-1"``); ``model_id`` records which backbone produced
    the features so a query embedded by another model can be refused by the caller; ``info`` is
    free-form metadata saved in meta.json (e.g. the query transform).
    """

    kind = "exact"

    def __init__(
        self,
        features: np.ndarray | torch.Tensor,
        ids: Sequence[str] | None = None,
        model_id: str = "",
        *,
        device: str | torch.device | None = None,
        info: dict | None = None,
    ) -> None:
        feats = _normalize(features)
        ids = [str(i) for i in range(feats.shape[0])] if ids is None else [str(i) for i in ids]
        if len(ids) != feats.shape[0]:
            raise DinolabError(f"{len(ids)} ids for {feats.shape[0]} feature rows")
        self.features = feats.to(device) if device is not None else feats
        self.ids = ids
        self.model_id = str(model_id)
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: str | torch.device) -> ExactIndex:
        self.features = self.features.to(device)
        return self

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        *,
        query_chunk: int = 1024,
        db_chunk: int = 65536,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine top-``k`` of each query (M, D): ``(scores, indices)`` (M, min(k, N)), on the CPU."""
        q = _as_tensor(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DinolabError(f"queries must be (M, {self.dim}), got shape {tuple(q.shape)}")
        return topk_cosine(
            _normalize(q, "queries"), self.features, k,
            query_chunk=query_chunk, db_chunk=db_chunk, normalized=True,
        )

    def vectors(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stored (normalised) vectors of ``rows`` (K, D), on the CPU."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64).ravel())
        return self.features[rows.to(self.features.device)].cpu()

    def ids_of(self, indices: np.ndarray | torch.Tensor | Sequence) -> list:
        """Map row indices (any nesting, e.g. the (M, k) result of ``search``) to ids."""
        arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        ids = self.ids
        if arr.ndim == 0:
            return ids[int(arr)]  # type: ignore[return-value]
        if arr.ndim == 1:
            return [ids[int(i)] for i in arr]
        return [self.ids_of(row) for row in arr]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write features.npy, ids.txt, then meta.json (each atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        bad = [i for i in self.ids if "\n" in i or "\r" in i]
        if bad:
            raise DinolabError(f"id {bad[0]!r} contains a line break; ids.txt holds one id per line")
        meta = folder / "meta.json"
        meta.unlink(missing_ok=True)  # an index folder without meta.json is incomplete
        feats = self.features.detach().cpu().numpy().astype(np.float32, copy=False)
        atomic_write(folder / "features.npy", lambda f: np.save(f, feats))
        atomic_write_text(folder / "ids.txt", "".join(i + "\n" for i in self.ids))
        atomic_write_json(meta, {
            "format": FORMAT, "version": VERSION, "model_id": self.model_id,
            "dim": self.dim, "count": len(self), "info": self.info,
        })
        return folder

    @classmethod
    def load(
        cls, folder: str | os.PathLike, *, device: str | torch.device | None = None, mmap: bool = False
    ) -> ExactIndex:
        """Read a folder written by ``save``; ``mmap=True`` memory-maps features.npy (CPU only)."""
        folder = Path(folder)
        meta = read_index_meta(folder)
        if meta.get("format") != FORMAT:
            raise DinolabError(f"{folder / 'meta.json'}: unknown index format {meta.get('format')!r}")
        feats = _load_features(folder / "features.npy", mmap)
        ids = read_ids(folder / "ids.txt")
        if feats.shape != (meta.get("count"), meta.get("dim")) or len(ids) != meta.get("count"):
            raise DinolabError(
                f"{folder}: features {feats.shape} / {len(ids)} ids disagree with meta.json "
                f"(count={meta['count']}, dim={meta['dim']})"
            )
        obj = cls.__new__(cls)
        t = torch.from_numpy(feats if mmap else np.ascontiguousarray(feats, dtype=np.float32))
        obj.features = t.to(device) if device is not None else t
        obj.ids = ids
        obj.model_id = meta.get("model_id", "")
        obj.info = meta.get("info", {})
        return obj


if TYPE_CHECKING:
    from dinolab.curate.faiss_index import FaissIndex

Index = Union[ExactIndex, "FaissIndex"]


def make_index(
    features: np.ndarray | torch.Tensor,
    ids: Sequence[str] | None = None,
    model_id: str = "",
    *,
    kind: str = "auto",
    device: str | torch.device | None = None,
    info: dict | None = None,
    **faiss_kw: Any,
) -> Index:
    """An ``ExactIndex`` (``kind="exact"``) or a ``FaissIndex`` (flat, ivf, hnsw, ivfpq) over ``features``.

    ``"auto"`` picks by size (``faiss_index.choose_kind``: exact up to 1M vectors). ``faiss_kw``
    (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``pq_m``, ``seed``) go to ``FaissIndex``.
    """
    from dinolab.curate import faiss_index

    n = int(features.shape[0])
    kind = faiss_index.choose_kind(n) if kind == "auto" else kind
    if kind not in faiss_index.KINDS:
        raise DinolabError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(faiss_index.KINDS)}")
    if kind == "exact":
        if faiss_kw:
            raise DinolabError(f"{sorted(faiss_kw)} only apply to faiss indexes, not to kind 'exact'")
        return ExactIndex(features, ids, model_id, device=device, info=info)
    return faiss_index.FaissIndex(features, ids, model_id, kind=kind, info=info, **faiss_kw)


def read_index_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of an index folder; ``DinolabError`` when the folder is not a complete index."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        raise DinolabError(f"{folder} is not a complete index folder (no meta.json); build it with dinolab index build")
    return read_json_object(meta_path, "an index's meta object")


def _load_features(path: Path, mmap: bool) -> np.ndarray:
    """features.npy as plain numbers: never unpickled (``allow_pickle=False``), float dtype checked."""
    try:
        feats = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)  # "c": writable view
    except (OSError, ValueError, EOFError) as e:  # missing, truncated, or an object array (pickled)
        raise DinolabError(f"cannot read {path} as an array of features: {str(e).splitlines()[0]}") from None
    if not isinstance(feats, np.ndarray) or not np.issubdtype(feats.dtype, np.floating):
        kind = getattr(feats, "dtype", type(feats).__name__)
        raise DinolabError(f"{path} holds {kind} values, not float features")
    return feats


def read_ids(path: str | os.PathLike) -> list[str]:
    """The ids of ``ids.txt`` (one per line; undecodable file-name bytes kept via surrogateescape)."""
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    return text.split("\n")[:-1] if text else []


def load_index(folder: str | os.PathLike, *, device: str | torch.device | None = None, mmap: bool = False) -> Index:
    """Open an index folder written by ``ExactIndex.save`` or ``FaissIndex.save``."""
    fmt = read_index_meta(folder).get("format")
    if fmt == FORMAT:
        return ExactIndex.load(folder, device=device, mmap=mmap)
    from dinolab.curate.faiss_index import FORMAT as FAISS_FORMAT
    from dinolab.curate.faiss_index import FaissIndex

    if fmt == FAISS_FORMAT:
        return FaissIndex.load(folder)
    raise DinolabError(f"{Path(folder) / 'meta.json'}: unknown index format {fmt!r}")


def query_transform(info: Mapping[str, Any], resize: int | None = None, crop: int | None = None,
                    *, where: str = "the index") -> tuple[int, int]:
    """``(resize, crop)`` of the classification transform that embeds queries for an index.

    ``resize`` / ``crop`` when given (a warning when they differ from what the index recorded: scores
    are then lower and rankings can change), else the sizes the index was embedded with (its ``info``,
    written by ``dinolab index build``), else ``DEFAULT_QUERY_TRANSFORM`` with a warning. Every query
    path (``dinolab index search``, ``dinolab serve``'s ``/v1/search``) goes through this, so an
    indexed image scores 1.0 against itself.
    """
    recorded = (info.get("resize"), info.get("crop"))
    if None in recorded:
        if resize is None or crop is None:
            log.warning("%s records no query transform (resize / crop); queries use %d / %d", where,
                        resize or DEFAULT_QUERY_TRANSFORM[0], crop or DEFAULT_QUERY_TRANSFORM[1])
        return resize or DEFAULT_QUERY_TRANSFORM[0], crop or DEFAULT_QUERY_TRANSFORM[1]
    out = (int(resize or recorded[0]), int(crop or recorded[1]))
    if out != recorded:
        log.warning("%s was embedded at resize %s / crop %s but queries use %d / %d: scores against it are "
                    "lower and rankings can differ", where, *recorded, *out)
    return out


# --------------------------------------------------------------------------- retrieval metrics


def average_precision(ranked_relevance: Sequence[bool] | np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one ranked list: mean of precision@r over the ranks r holding a relevant item.

    The denominator is ``n_relevant`` (all relevant items that exist; missing ones count as 0),
    defaulting to the relevant items in the list. 0.0 when there is nothing relevant.
    """
    rel = np.asarray(ranked_relevance, dtype=bool).ravel()
    denom = int(rel.sum()) if n_relevant is None else int(n_relevant)
    if denom <= 0:
        return 0.0
    hits = np.cumsum(rel)
    prec = hits / np.arange(1, rel.size + 1)
    return float(prec[rel].sum() / denom)


def _self_rows(exclude_self: bool | np.ndarray, m: int) -> np.ndarray | None:
    if exclude_self is False or exclude_self is None:
        return None
    if exclude_self is True:
        return np.arange(m, dtype=np.int64)
    rows = np.asarray(exclude_self, dtype=np.int64).ravel()
    if rows.size != m:
        raise DinolabError(f"exclude_self has {rows.size} entries for {m} queries")
    return rows


def _relevance(indices, query_labels, db_labels, exclude_self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relevant (M, K), valid (M, K), n_relevant_in_db (M,)) with self matches marked invalid."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    if idx.ndim != 2:
        raise DinolabError(f"indices must be (M, K), got shape {idx.shape}")
    ql = np.asarray(query_labels).ravel()
    dl = np.asarray(db_labels).ravel()
    if ql.size != idx.shape[0]:
        raise DinolabError(f"{ql.size} query labels for {idx.shape[0]} queries")
    valid = idx >= 0
    rel = valid & (dl[np.clip(idx, 0, None)] == ql[:, None])
    uniq, inv = np.unique(np.concatenate([dl, ql]), return_inverse=True)
    counts = np.bincount(inv[: dl.size], minlength=uniq.size)
    n_rel = counts[inv[dl.size :]]
    rows = _self_rows(exclude_self, idx.shape[0])
    if rows is not None:
        is_self = idx == rows[:, None]
        valid &= ~is_self
        rel &= ~is_self
        in_db = (rows >= 0) & (rows < dl.size)
        n_rel = n_rel - (in_db & (dl[np.clip(rows, 0, max(dl.size - 1, 0))] == ql)).astype(np.int64)
    return rel, valid, n_rel


def mean_average_precision(
    indices: np.ndarray | torch.Tensor,
    query_labels: np.ndarray | Sequence,
    db_labels: np.ndarray | Sequence,
    *,
    exclude_self: bool | np.ndarray = True,
) -> float:
    """Label-based mAP of ranked retrieval lists ``indices`` (M, K) (e.g. from ``search``).

    A retrieved item is relevant when its label equals the query's. ``exclude_self=True`` means
    query i is database row i (leave-one-out, queries = database) and that row is dropped from its
    list; pass an int array of each query's database row (-1: none) or ``False`` for a separate
    query set. Ask ``search`` for K+1 neighbours so K remain after the self match is dropped.
    Each AP divides by min(relevant items in the database, length of the list), so K = N gives
    the usual full mAP and a truncated list reaches 1.0 when all its items are relevant.
    Queries with no relevant database item are left out of the mean (NaN if none are left).
    """
    rel, valid, n_rel = _relevance(indices, query_labels, db_labels, exclude_self)
    aps = []
    for r, v, n in zip(rel, valid, n_rel, strict=True):
        if n <= 0:
            continue
        ranked = r[v]
        aps.append(average_precision(ranked, min(int(n), ranked.size)) if ranked.size else 0.0)
    return float(np.mean(aps)) if aps else float("nan")


def recall_at_k(
    indices: np.ndarray | torch.Tensor,
    query_labels: np.ndarray | Sequence,
    db_labels: np.ndarray | Sequence,
    k: int | Sequence[int] = 1,
    *,
    exclude_self: bool | np.ndarray = True,
) -> float | dict[int, float]:
    """Fraction of queries with at least one relevant item among their first ``k`` results.

    ``exclude_self`` as in ``mean_average_precision`` (self matches do not use up a rank).
    An int ``k`` gives a float; a sequence gives ``{k: recall}``.
    """
    rel, valid, _ = _relevance(indices, query_labels, db_labels, exclude_self)
    rank = np.cumsum(valid, axis=1)  # 1-based rank among valid entries
    m = rel.shape[0]

    def one(kk: int) -> float:
        if kk < 1:
            raise DinolabError(f"k must be >= 1, got {kk}")
        if m == 0:
            return float("nan")
        return float((rel & (rank <= kk)).any(axis=1).mean())

    if isinstance(k, int | np.integer):
        return one(int(k))
    return {int(kk): one(int(kk)) for kk in k}
