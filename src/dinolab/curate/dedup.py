"""Near-duplicate removal by cosine similarity (the DINOv2 curation's copy-detection step).

``find_duplicates`` searches each pool vector's top-``k`` neighbours in the pool itself (chunked,
exact, see ``curate.index.topk_cosine``), keeps the pairs whose cosine similarity is at least
``threshold``, and groups them into connected components: near-duplicates chain transitively
(a~b, b~c puts a, b, c in one component even when a and c are below the threshold). One
representative per component is kept: **the lowest index** (deterministic, and with a sorted id
list the lexicographically first id).

A component with more than ``k + 1`` near-identical members is still joined through overlapping
neighbour lists in practice, but raise ``k`` when the pool holds large clusters of copies.

``remove_near_eval`` is the test-leak protection: pool images too close to any evaluation image
are dropped before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinolab.curate.index import _normalize, topk_cosine
from dinolab.errors import DinolabError

__all__ = ["DedupResult", "find_duplicates", "remove_near_eval"]


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
) -> DedupResult:
    """Near-duplicate components of ``features`` (N, D) by cosine similarity >= ``threshold``.

    ``k``: neighbours searched per point (self excluded); ``chunk``: query and database chunk
    size of the exact search; ``device``: where the search runs (e.g. ``"cuda"``).
    """
    _check_threshold(threshold)
    if k < 1:
        raise DinolabError(f"k must be >= 1, got {k}")
    x = _normalize(features)
    n = x.shape[0]
    if n == 0:
        return DedupResult([], np.ones(0, bool), np.zeros((0, 2), np.int64), np.zeros(0, np.float32))
    scores, idx = topk_cosine(x, x, k + 1, query_chunk=chunk, db_chunk=max(chunk, k + 1),
                              device=device, normalized=True)
    s, nb = scores.numpy(), idx.numpy()
    rows = np.broadcast_to(np.arange(n)[:, None], nb.shape)
    hit = (s >= threshold) & (nb != rows)
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
