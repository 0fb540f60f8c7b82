"""Retrieval-based selection (the DINOv2 curation's step 3): keep the pool images that look like a set of
seed (curated) images.

Two variants, as in the DINOv2 paper (Oquab et al. 2023, section 3 and appendix):

* ``"sample"`` — each seed image retrieves its ``k`` nearest pool images (cosine), optionally only
  those with similarity >= ``min_similarity``; the selection is the union. Cost: one top-k search
  of the seeds against the pool.
* ``"cluster"`` — for large seed sets: the pool is clustered with k-means into ``n_clusters``
  (default round(sqrt(N))); each seed's ``k`` nearest pool images vote for their clusters, and every
  cluster with at least ``min_hits`` votes is kept, whole or up to ``per_cluster`` images of it
  (drawn with ``seed``). This keeps the whole neighbourhood of the seed distribution, not only the
  closest images.

``"auto"`` uses ``"cluster"`` when there are more than ``cluster_above`` seeds (default 100,000),
else ``"sample"``. The searches are exact (torch, chunked, CPU or GPU) unless ``index_kind`` names a
faiss kind (``curate.faiss_index``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from dinolab.curate.index import _normalize, make_index
from dinolab.curate.kmeans import kmeans
from dinolab.errors import DinolabError
from dinolab.eval.neighbours import topk_cosine

log = logging.getLogger(__name__)

__all__ = ["MODES", "SelectionResult", "select_by_retrieval"]

MODES = ("auto", "sample", "cluster")


@dataclass
class SelectionResult:
    """``selected``: sorted pool indices (int64). ``mode``: the variant that ran.
    ``hits``: (N_pool,) how many seeds retrieved each pool image (among their ``k`` neighbours).
    Cluster mode only: ``assignments`` (N_pool,) k-means cluster of each pool image and ``clusters``
    (sorted ids of the kept clusters), with ``cluster_hits`` (n_clusters,) the votes per cluster."""

    selected: np.ndarray
    mode: str
    hits: np.ndarray
    assignments: np.ndarray | None = None
    clusters: np.ndarray | None = None
    cluster_hits: np.ndarray | None = None


def _neighbours(pool: torch.Tensor, seeds: torch.Tensor, k: int, index_kind: str, device, progress: bool,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, pool rows) (M, k) of each seed's k nearest pool images; rows are -1 where none."""
    if index_kind == "exact":
        s, i = topk_cosine(seeds, pool, k, device=device, normalized=True, progress=progress)
    else:
        s, i = make_index(pool, kind=index_kind, seed=seed).search(seeds, k)
    return s.numpy(), i.numpy()


def select_by_retrieval(
    pool: np.ndarray | torch.Tensor,
    seeds: np.ndarray | torch.Tensor,
    *,
    mode: str = "auto",
    k: int = 4,
    min_similarity: float | None = None,
    n_clusters: int | None = None,
    per_cluster: int | None = None,
    min_hits: int = 1,
    cluster_above: int = 100_000,
    n_iter: int = 20,
    kmeans_backend: str = "torch",
    index_kind: str = "exact",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SelectionResult:
    """Pool images retrieved by the seed images (see the module docstring for the two variants).

    ``pool`` (N, D) and ``seeds`` (M, D) are features of the same model (normalised here).
    ``k`` neighbours per seed; ``min_similarity`` drops retrieved images below that cosine.
    Cluster mode: ``n_clusters``, ``per_cluster``, ``min_hits``, ``n_iter`` and ``kmeans_backend``
    ("torch" or "faiss"). Deterministic for a given ``seed``.
    """
    if mode not in MODES:
        raise DinolabError(f"unknown selection mode {mode!r}; choose one of {', '.join(MODES)}")
    if k < 1 or min_hits < 1:
        raise DinolabError(f"k and min_hits must be >= 1, got k={k}, min_hits={min_hits}")
    if per_cluster is not None and per_cluster < 1:
        raise DinolabError(f"per_cluster must be >= 1 (or None for whole clusters), got {per_cluster}")
    x, q = _normalize(pool, "pool"), _normalize(seeds, "seeds")
    n, m = x.shape[0], q.shape[0]
    if n == 0 or m == 0:
        raise DinolabError(f"selection needs a non-empty pool and seed set (got {n} pool and {m} seed images)")
    if x.shape[1] != q.shape[1]:
        raise DinolabError(f"pool features are {x.shape[1]}-d but seed features {q.shape[1]}-d: embed both "
                           "with the same model")
    if mode == "auto":
        mode = "cluster" if m > cluster_above else "sample"
    scores, rows = _neighbours(x, q, min(k, n), index_kind, device, progress, seed)
    ok = rows >= 0
    if min_similarity is not None:
        ok &= scores >= min_similarity
    hits = np.bincount(rows[ok], minlength=n).astype(np.int64)
    if mode == "sample":
        log.info("sample-based selection: %d seeds x k=%d -> %d pool images", m, k, int((hits > 0).sum()))
        return SelectionResult(np.flatnonzero(hits > 0).astype(np.int64), "sample", hits)

    c = n_clusters or max(1, round(math.sqrt(n)))
    if not 1 <= c <= n:
        raise DinolabError(f"n_clusters must be in [1, {n}] (pool size), got {c}")
    km = kmeans(x, c, n_iter=n_iter, seed=seed, device=device, backend=kmeans_backend)
    assign = km.assignments.cpu().numpy().astype(np.int64)
    cluster_hits = np.bincount(assign, weights=hits, minlength=c).astype(np.int64)
    kept = np.flatnonzero(cluster_hits >= min_hits)
    rng = np.random.default_rng(seed)
    order = np.argsort(assign, kind="stable")  # pool rows grouped by cluster, ascending within each
    starts = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=c))])
    chosen = []
    for cl in kept.tolist():
        members = order[starts[cl]:starts[cl + 1]]
        if per_cluster is not None and members.size > per_cluster:
            members = rng.choice(members, size=per_cluster, replace=False)
        chosen.append(members)
    selected = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    log.info("cluster-based selection: %d of %d clusters hit by %d seeds -> %d pool images",
             kept.size, c, m, selected.size)
    return SelectionResult(selected, "cluster", hits, assign, kept, cluster_hits)
