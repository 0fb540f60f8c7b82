"""Near-duplicate removal by cosine similarity (the DINOv2 curation's copy-detection step).

``find_duplicates`` searches each pool vector's top-``k`` neighbours in the pool itself (chunked,
exact, see ``curate.index.topk_cosine``), keeps the pairs whose cosine similarity is at least
``threshold``, and groups them into connected components: near-duplicates chain transitively
(a~b, b~c puts a, b, c in one component even when a and c are below the threshold). One
representative per component is kept: **the lowest index** (deterministic, and with a sorted id
list the lexicographically first id).

A component with more than ``k + 1`` near-identical members is still joined through overlapping
neighbour lists in practice, but raise ``k`` when the pool holds large clusters of copies.

How the neighbours are searched (``method``):

* ``"exact"``: brute force (torch, chunked, CPU or GPU): 2 N^2 D FLOPs, hours at N = 1M on a CPU;
* ``"cluster"``: k-means into ``nlist`` clusters (default round(sqrt(N))), then exact search of each
  point among the members of its ``nprobe`` nearest clusters (as SemDeDup, Abbas et al. 2023).
  About 2 N^2 D nprobe / nlist FLOPs in matrix products (torch, CPU or GPU); near-copies almost
  always share a cluster, so nprobe = 1 already finds nearly all pairs above a high threshold;
* ``"ivf"`` / ``"hnsw"``: a faiss index (``curate.faiss_index``; nprobe of nlist IVF cells scanned
  per query). Scanning is memory-bound on CPUs: choose a large nlist and a small nprobe.

``remove_near_eval`` is the test-leak protection: pool images too close to any evaluation image
are dropped before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from dinolab.curate.index import _normalize, topk_cosine
from dinolab.errors import DinolabError

__all__ = ["METHODS", "DedupResult", "find_duplicates", "remove_near_eval"]

METHODS = ("exact", "cluster", "ivf", "hnsw")


@dataclass
class DedupResult:
    """``components``: index arrays (ascending, size > 1), ordered by their lowest index.
    ``keep``: bool (N,), False for every component member except its lowest index.
    ``pairs``: int64 (P, 2), i < j, each near-duplicate pair found (unique, sorted).
    ``similarities``: float32 (P,), the cosine similarity of each pair."""

    components: list[np.ndarray]
    keep: np.ndarray
    pairs: np.ndarray
    similarities: np.ndarray

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())


def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise DinolabError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")


def find_duplicates(
    features: np.ndarray | torch.Tensor,
    *,
    threshold: float = 0.95,
    k: int = 16,
    chunk: int = 4096,
    device: str | torch.device | None = None,
    method: str = "exact",
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: bool = False,
) -> DedupResult:
    """Near-duplicate components of ``features`` (N, D) by cosine similarity >= ``threshold``.

    ``k``: neighbours searched per point (self excluded); ``chunk``: query and database chunk
    size of the exact search; ``device``: where the exact search runs (e.g. ``"cuda"``);
    ``method``: ``exact``, ``cluster`` (k-means cells, torch) or ``ivf`` / ``hnsw`` (faiss); ``nlist``
    / ``nprobe``: cells and cells searched per point for ``cluster`` (default nprobe 1) and ``ivf``
    (default 16); see the module docstring.
    """
    _check_threshold(threshold)
    if k < 1:
        raise DinolabError(f"k must be >= 1, got {k}")
    if method not in METHODS:
        raise DinolabError(f"unknown dedup method {method!r}; choose one of {', '.join(METHODS)}")
    x = _normalize(features)
    n = x.shape[0]
    if n == 0:
        return DedupResult([], np.ones(0, bool), np.zeros((0, 2), np.int64), np.zeros(0, np.float32))
    if method == "exact":
        scores, idx = topk_cosine(x, x, k + 1, query_chunk=chunk, db_chunk=max(chunk, k + 1),
                                  device=device, normalized=True, progress=progress)
    elif method == "cluster":
        scores, idx = _cluster_neighbours(x, k + 1, nlist, nprobe or 1, chunk, device, progress)
    else:
        scores, idx = _approximate_neighbours(x, k + 1, method, nlist, nprobe or 16, chunk, progress)
    s, nb = scores.numpy(), idx.numpy()
    rows = np.broadcast_to(np.arange(n)[:, None], nb.shape)
    hit = (s >= threshold) & (nb != rows) & (nb >= 0)
    a, b, sim = rows[hit], nb[hit], s[hit]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    pairs = pairs.reshape(-1, 2)
    sims = sim[first].astype(np.float32)

    keep = np.ones(n, dtype=bool)
    components: list[np.ndarray] = []
    if len(pairs):
        graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        sizes = np.bincount(labels)
        members = np.flatnonzero(sizes[labels] > 1)  # ascending
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(int(labels[i]), []).append(int(i))
        components = sorted((np.asarray(g, dtype=np.int64) for g in groups.values()), key=lambda c: c[0])
        for comp in components:
            keep[comp[1:]] = False
    return DedupResult(components=components, keep=keep, pairs=pairs, similarities=sims)


def _cluster_neighbours(x: torch.Tensor, k: int, n_clusters: int | None, nprobe: int, chunk: int,
                        device: str | torch.device | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every row of ``x`` (unit rows) among the members of its ``nprobe`` nearest k-means clusters."""
    from dinolab.curate.kmeans import kmeans

    n = x.shape[0]
    c = min(n, n_clusters or max(1, round(math.sqrt(n))))
    km = kmeans(x, c, n_iter=10, seed=0, device=device)
    nprobe = max(1, min(nprobe, c))
    cent = km.centroids.float().cpu()
    half_sq = 0.5 * (cent * cent).sum(1)
    probes = torch.empty(n, nprobe, dtype=torch.int64)  # nearest centroids: max x.c - |c|^2 / 2
    for s in range(0, n, 65536):
        probes[s:s + 65536] = (x[s:s + 65536] @ cent.T - half_sq).topk(nprobe, dim=1).indices
    members = _groups(km.assignments.cpu().numpy(), c)  # database rows of each cluster
    queries = _groups(probes.numpy().ravel(), c)  # (row * nprobe + j) entries probing each cluster
    best_s = torch.full((n, k), float("-inf"))
    best_i = torch.full((n, k), -1, dtype=torch.int64)
    for cl in tqdm(range(c), disable=not progress, desc="dedup (cluster)", unit="cluster"):
        db_rows, q_rows = members[cl], torch.from_numpy(queries[cl] // nprobe)
        if db_rows.size == 0 or q_rows.numel() == 0:
            continue
        s, i = topk_cosine(x[q_rows], x[torch.from_numpy(db_rows)], k, query_chunk=chunk,
                           db_chunk=max(chunk, k), device=device, normalized=True)
        cat_s = torch.cat([best_s[q_rows], s.float()], dim=1)
        cat_i = torch.cat([best_i[q_rows], torch.from_numpy(db_rows)[i]], dim=1)
        top = cat_s.topk(k, dim=1)  # merge with what other probed clusters gave these rows
        best_s[q_rows], best_i[q_rows] = top.values, cat_i.gather(1, top.indices)
    return best_s, best_i


def _groups(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """Indices (ascending) holding each of the labels 0..k-1."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=k))[:-1])


def _approximate_neighbours(x: torch.Tensor, k: int, method: str, nlist: int | None, nprobe: int, chunk: int,
                            progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every row of ``x`` among all rows through a faiss IVF or HNSW index, chunked over queries."""
    from dinolab.curate.faiss_index import FaissIndex

    kw = {"nlist": nlist, "nprobe": nprobe} if method == "ivf" else {"ef_search": max(128, 2 * k)}
    index = FaissIndex(x, kind=method, **kw)
    parts = [index.search(x[s:s + chunk], k)
             for s in tqdm(range(0, x.shape[0], chunk), disable=not progress, desc=f"dedup ({method})", unit="chunk")]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def remove_near_eval(
    pool_features: np.ndarray | torch.Tensor,
    eval_features: np.ndarray | torch.Tensor,
    *,
    threshold: float = 0.95,
    chunk: int = 4096,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Keep mask (bool, (N_pool,)): False for pool rows whose cosine similarity to any evaluation
    row is >= ``threshold`` (near-copies of test images must not be trained on)."""
    _check_threshold(threshold)
    pool = _normalize(pool_features, "pool_features")
    ev = _normalize(eval_features, "eval_features")
    if ev.shape[0] == 0 or pool.shape[0] == 0:
        return np.ones(pool.shape[0], dtype=bool)
    if pool.shape[1] != ev.shape[1]:
        raise DinolabError(f"pool dim {pool.shape[1]} != eval dim {ev.shape[1]}")
    best, _ = topk_cosine(pool, ev, 1, query_chunk=chunk, db_chunk=max(chunk, 1), device=device,
                          normalized=True)
    return best[:, 0].numpy() < threshold
