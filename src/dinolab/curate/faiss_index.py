"""faiss indexes beside ``ExactIndex``: flat inner product (exact) and approximate IVF / HNSW / IVF-PQ.

All kinds hold L2-normalised vectors and use the inner product, so scores are cosine similarities
(approximate for PQ, whose vectors are compressed). ``FaissIndex`` has the shape of
``ExactIndex`` (``search``, ``vectors``, ``ids``, ``model_id``, ``save``, ``load``), and
``dinolab.curate.index.load_index`` opens either from disk.

=========  ======================  ==========================================================
kind       faiss factory string     what it trades
=========  ======================  ==========================================================
flat       ``Flat``                 exact, brute force in faiss (4 D bytes per vector)
ivf        ``IVF{nlist},Flat``      searches the ``nprobe`` of ``nlist`` k-means cells nearest to
                                    the query; exact vectors, recall set by nprobe / nlist
hnsw       ``HNSW{M}``              graph search (``M`` links per node, ``efSearch`` candidates);
                                    fast and accurate, ~(4 D + 8 M) bytes per vector, no training
ivfpq      ``IVF{nlist},PQ{m}x8``   IVF over product-quantised codes: ``m`` bytes per vector
                                    (e.g. 96 for D=384 instead of 1536); scores are approximate
=========  ======================  ==========================================================

``choose_kind(n)`` picks by size when the caller says ``"auto"``: exact torch search up to 1M
vectors, IVF up to 20M, IVF-PQ beyond. Defaults: ``nlist`` = the power of two nearest to
4 sqrt(N) (at most N / 39, faiss's minimum of training points per cell), ``nprobe`` = 32,
HNSW ``M`` = 32 and ``efSearch`` = 128, PQ ``m`` = the largest divisor of D that is at most D / 4.
IVF and PQ codebooks are trained on at most ``256 x nlist`` vectors drawn with ``seed``.

Folder written by ``FaissIndex.save``::

    index.faiss   the faiss index (faiss.serialize_index)
    ids.txt       one id per line, in row order
    meta.json     {"format", "version", "kind", "factory", "model_id", "dim", "count", "nprobe",
                   "ef_search", "info"} (written last: the index is complete)

faiss comes from the ``faiss-cpu`` package (``pip install 'dinolab[curate]'``); it is imported only
here, when an index of this kind is built or loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinolab.curate.index import read_ids, read_index_meta
from dinolab.errors import DinolabError
from dinolab.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["FAISS_KINDS", "KINDS", "FaissIndex", "choose_kind", "default_nlist", "default_pq_m", "import_faiss"]

FORMAT = "dinolab-faiss-index"
VERSION = 1
FAISS_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
KINDS = ("exact", *FAISS_KINDS)  # "exact" is the torch ExactIndex
EXACT_MAX = 1_000_000  # choose_kind: exact torch search up to this many vectors
IVF_MAX = 20_000_000  # ... IVF with full vectors up to this many, IVF-PQ beyond


def import_faiss() -> Any:
    """The ``faiss`` module, or a ``DinolabError`` saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise DinolabError("this needs faiss: pip install faiss-cpu (or pip install 'dinolab[curate]'); "
                           "exact search (--kind exact) and the torch k-means work without it") from e
    return faiss


def choose_kind(n: int) -> str:
    """The index kind ``"auto"`` means for ``n`` vectors: exact, ivf or ivfpq (see the module docstring)."""
    if n <= EXACT_MAX:
        return "exact"
    return "ivf" if n <= IVF_MAX else "ivfpq"


def default_nlist(n: int) -> int:
    """Power of two nearest to 4 sqrt(n), at least 1 and at most n / 39 (faiss: >= 39 points per cell)."""
    if n < 1:
        raise DinolabError("an IVF index needs at least one vector")
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(target, n // 39)))


def default_pq_m(dim: int) -> int:
    """Largest divisor of ``dim`` that is at most dim / 4 (sub-vectors of >= 4 dims), at least 1."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def _factory(kind: str, dim: int, n: int, nlist: int | None, hnsw_m: int, pq_m: int | None) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m}"
    nlist = nlist or default_nlist(n)
    if nlist > n:
        raise DinolabError(f"nlist={nlist} is more than the {n} vectors to index; pass a smaller nlist")
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    pq_m = pq_m or default_pq_m(dim)
    if dim % pq_m:
        raise DinolabError(f"PQ m={pq_m} must divide the dimension {dim}; try {default_pq_m(dim)}")
    nbits = 8 if n >= 39 * 256 else max(1, int(math.log2(max(2, n // 39))))  # codebook size <= n / 39
    return f"IVF{nlist},PQ{pq_m}x{nbits}"


def _unit_rows(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise DinolabError(f"{name} must be 2-D (N, D), got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


def _check_ids(ids: Sequence[str]) -> None:
    bad = [i for i in ids if "\n" in i or "\r" in i]
    if bad:
        raise DinolabError(f"id {bad[0]!r} contains a line break; ids.txt holds one id per line")


class FaissIndex:
    """A faiss index (``kind`` in flat, ivf, hnsw, ivfpq) over L2-normalised ``features`` (N, D).

    ``nlist`` / ``pq_m`` / ``hnsw_m``: structure (defaults in the module docstring);
    ``nprobe`` / ``ef_search``: search-time accuracy knobs, stored with the index and changeable
    per call. ``info`` is free-form metadata saved in meta.json (e.g. the query transform).
    """

    def __init__(
        self,
        features: np.ndarray | torch.Tensor,
        ids: Sequence[str] | None = None,
        model_id: str = "",
        *,
        kind: str = "ivf",
        nlist: int | None = None,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_search: int = 128,
        pq_m: int | None = None,
        seed: int = 0,
        info: dict | None = None,
    ) -> None:
        if kind not in FAISS_KINDS:
            raise DinolabError(f"unknown faiss index kind {kind!r}; choose one of {', '.join(FAISS_KINDS)}")
        faiss = import_faiss()
        x = _unit_rows(features, "features")
        n, dim = x.shape
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(ids) != n:
            raise DinolabError(f"{len(ids)} ids for {n} feature rows")
        if n == 0:
            raise DinolabError("cannot build a faiss index over zero vectors")
        self.factory = _factory(kind, dim, n, nlist, hnsw_m, pq_m)
        index = faiss.index_factory(dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed  # IVF coarse k-means
            if isinstance(index, faiss.IndexIVFPQ):  # polysemous codes only serve Hamming-filtered search,
                index.do_polysemous_training = False  # which we do not use, and take 10x the training time
            rng = np.random.default_rng(seed)
            sample = x if n <= 256 * ivf.nlist else x[np.sort(rng.choice(n, 256 * ivf.nlist, replace=False))]
            index.train(sample)
        index.add(x)
        if kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(index).make_direct_map()  # vectors(rows) for queries by id
        self.index, self.kind, self.ids, self.model_id = index, kind, ids, str(model_id)
        self.nprobe, self.ef_search, self.info = int(nprobe), int(ef_search), dict(info or {})

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` by inner product of the normalised queries (M, D): ``(scores, indices)`` (M, min(k, N))
        float32 / int64 tensors, best first. Missing results (possible with a small ``nprobe``) are -1."""
        if k < 1:
            raise DinolabError(f"k must be >= 1, got {k}")
        q = _unit_rows(queries, "queries")
        if q.shape[1] != self.dim:
            raise DinolabError(f"queries must be (M, {self.dim}), got shape {q.shape}")
        faiss = import_faiss()
        if self.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe or self.nprobe)
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = max(int(ef_search or self.ef_search), k)
        scores, idx = self.index.search(q, min(k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64, copy=False))

    def vectors(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stored vectors of ``rows`` (K, D) (decoded from their codes for ivfpq: approximate)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise DinolabError(f"row indices must be in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return torch.from_numpy(self.index.reconstruct_batch(rows))

    def ids_of(self, indices: np.ndarray | torch.Tensor | Sequence) -> list:
        """Map row indices (any nesting, e.g. the (M, k) result of ``search``) to ids; -1 maps to None."""
        arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if arr.ndim == 0:
            return self.ids[int(arr)] if arr >= 0 else None  # type: ignore[return-value]
        return [self.ids_of(row) for row in arr]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write index.faiss, ids.txt, then meta.json (each atomically) into ``folder``."""
        faiss = import_faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _check_ids(self.ids)
        meta = folder / "meta.json"
        meta.unlink(missing_ok=True)  # an index folder without meta.json is incomplete
        blob = faiss.serialize_index(self.index)  # uint8 array
        atomic_write(folder / "index.faiss", lambda f: f.write(blob.tobytes()))
        atomic_write_text(folder / "ids.txt", "".join(i + "\n" for i in self.ids))
        atomic_write_json(meta, {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "factory": self.factory,
            "model_id": self.model_id, "dim": self.dim, "count": len(self), "nprobe": self.nprobe,
            "ef_search": self.ef_search, "info": self.info,
        })
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FaissIndex:
        """Read a folder written by ``save``."""
        faiss = import_faiss()
        folder = Path(folder)
        meta = read_index_meta(folder)
        if meta.get("format") != FORMAT:
            raise DinolabError(f"{folder / 'meta.json'}: not a faiss index folder (format {meta.get('format')!r})")
        index = faiss.read_index(str(folder / "index.faiss"))
        ids = read_ids(folder / "ids.txt")
        if index.ntotal != meta["count"] or index.d != meta["dim"] or len(ids) != meta["count"]:
            raise DinolabError(f"{folder}: index ({index.ntotal} x {index.d}) / {len(ids)} ids disagree with "
                               f"meta.json (count={meta['count']}, dim={meta['dim']}); rebuild the index")
        obj = cls.__new__(cls)
        obj.index, obj.kind, obj.factory, obj.ids = index, meta["kind"], meta["factory"], ids
        obj.model_id, obj.nprobe, obj.ef_search = meta.get("model_id", ""), meta["nprobe"], meta["ef_search"]
        obj.info = meta.get("info", {})
        return obj
