"""Balanced hierarchical sampling over a hierarchical k-means tree (Vo et al. 2024).

Algorithm (``balanced_sample``)::

    tree:  root -> clusters of the top level -> ... -> clusters of level 1 -> points
    size(node) = number of points under the node

    split(node, budget):
        water-fill the budget over the node's children: find the largest integer t with
        sum_i min(size_i, t) <= budget, give child i min(size_i, t); so a child smaller than its
        equal share takes all its points and the rest goes to the others. The remaining
        r = budget - sum_i min(size_i, t) points (r < number of children bigger than t) go one each
        to r children bigger than t, drawn at random (seeded).
        recurse into every child with its count.
    at a level-1 cluster (leaf cluster) with count c: take c of its points, at random
    ("random") or the c points closest to the centroid ("closest", ties by index).

A budget at least the node's size takes the whole node, so ``n_target >= N`` returns every point.
The result is deterministic for a given ``seed`` (one numpy Generator, fixed traversal order).
Small clusters (the tail of the distribution) get as many points as the head clusters, which
flattens a long-tailed pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinolab.curate.kmeans import KMeansResult

__all__ = ["balanced_sample", "water_fill"]


def water_fill(sizes: Sequence[int] | np.ndarray, budget: int,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Split ``budget`` as equally as possible among children of the given ``sizes`` (each gets <= its size).

    Returns int64 counts summing to ``min(budget, sum(sizes))``. The integer remainder goes one
    each to children that still have room, chosen with ``rng`` (default: the first ones).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative integers")
    budget = int(budget)
    if budget >= int(sizes.sum()):
        return sizes.copy()
    if budget <= 0:
        return np.zeros_like(sizes)
    lo, hi = 0, int(sizes.max())  # f(lo) <= budget < f(hi), f(t) = sum(min(sizes, t))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(np.minimum(sizes, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid
    counts = np.minimum(sizes, lo)
    rest = budget - int(counts.sum())
    if rest:
        room = np.flatnonzero(sizes > lo)
        pick = room[:rest] if rng is None else rng.choice(room, size=rest, replace=False)
        counts[pick] += 1
    return counts


def _groups(assign: np.ndarray, k: int) -> list[np.ndarray]:
    """Members (ascending indices) of each of k groups."""
    order = np.argsort(assign, kind="stable")
    bounds = np.cumsum(np.bincount(assign, minlength=k))[:-1]
    return np.split(order, bounds)


def balanced_sample(
    levels: Sequence[KMeansResult],
    n_target: int,
    *,
    seed: int = 0,
    strategy: str = "random",
) -> np.ndarray:
    """Indices (sorted, int64) of ``min(n_target, N)`` points chosen by balanced hierarchical sampling.

    ``levels`` is the output of ``hierarchical_kmeans`` (finest level first; ``levels[0]`` assigns the
    N points). ``strategy``: ``"random"`` or ``"closest"`` (needs ``levels[0].distances``).
    See the module docstring for the algorithm.
    """
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy must be 'random' or 'closest', got {strategy!r}")
    if not levels:
        raise ValueError("levels must not be empty")
    if n_target < 0:
        raise ValueError("n_target must be >= 0")
    rng = np.random.default_rng(seed)
    assigns = [r.assignments.detach().cpu().numpy().astype(np.int64) for r in levels]
    ks = [int(r.centroids.shape[0]) for r in levels]
    n = assigns[0].shape[0]
    dists = None
    if strategy == "closest":
        if levels[0].distances is None:
            raise ValueError("strategy='closest' needs levels[0].distances")
        dists = levels[0].distances.detach().cpu().double().numpy()

    # children[l][j]: members of node j of level l (points for l = 0, level l-1 nodes otherwise)
    children = [_groups(a, k) for a, k in zip(assigns, ks, strict=True)]
    # sizes[l][j]: number of points under node j of level l
    sizes = [np.bincount(assigns[0], minlength=ks[0]).astype(np.int64)]
    for lvl in range(1, len(levels)):
        sizes.append(np.bincount(assigns[lvl], weights=sizes[-1], minlength=ks[lvl]).astype(np.int64))

    selected: list[np.ndarray] = []

    def visit(lvl: int, node: int, budget: int) -> None:
        members = children[lvl][node]
        if lvl == 0:
            if budget >= members.size:
                selected.append(members)
            elif strategy == "random":
                selected.append(rng.choice(members, size=budget, replace=False))
            else:
                order = np.lexsort((members, dists[members]))
                selected.append(members[order[:budget]])
            return
        counts = water_fill(sizes[lvl - 1][members], budget, rng)
        for child, c in zip(members.tolist(), counts.tolist(), strict=True):
            if c:
                visit(lvl - 1, child, c)

    top = len(levels) - 1
    root_counts = water_fill(sizes[top], min(int(n_target), n), rng)
    for node, c in enumerate(root_counts.tolist()):
        if c:
            visit(top, node, c)
    if not selected:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(selected).astype(np.int64))
