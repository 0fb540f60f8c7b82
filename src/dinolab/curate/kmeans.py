"""k-means and hierarchical k-means in torch (CPU or GPU).

This is a plain torch implementation (Lloyd iterations with chunked assignment). ``backend="faiss"``
runs faiss's k-means (``faiss.Kmeans``, CPU; all points used, no subsampling) from the same
initial centroids instead; the result has the same form. faiss always runs ``n_iter`` iterations
and re-seeds an empty cluster by splitting a large one.

``kmeans``
    * assignment is chunked: at most ``chunk x k`` distances exist at a time, so N can be large;
    * init ``"k-means++"`` is greedy k-means++ (as scikit-learn: ``2 + log k`` candidates per step,
      keep the one that lowers the potential most), seeded, run on a random subsample of
      ``init_sample`` points when N is larger than that (default ``max(100_000, 64 * k)``);
      ``"random"`` picks k distinct points; a ``(k, D)`` tensor is used as given;
    * an empty cluster is re-seeded at the point farthest from its centroid (the next farthest for
      the next empty cluster, ...), and that point moves to it;
    * iterations stop early when the assignments no longer change;
    * ``spherical=True`` L2-normalises the points and keeps centroids on the unit sphere.

``hierarchical_kmeans`` (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning"):
level 1 clusters the points into ``ks[0]`` clusters, level l+1 clusters the ``ks[l-1]`` centroids of
level l into ``ks[l]`` clusters, which gives a tree whose leaves are the points.
``point_assignments`` maps every point to its cluster at every level.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "KMeansResult", "hierarchical_kmeans", "kmeans", "point_assignments"]

BACKENDS = ("torch", "faiss")


@dataclass
class KMeansResult:
    """Result of one k-means run.

    centroids    (k, D) float
    assignments  (N,) int64, index of each point's centroid
    inertia      sum of squared Euclidean distances of the points to their centroids
                 (after normalisation when spherical)
    n_iter_run   number of Lloyd (centroid update) steps done
    distances    (N,) squared distance of each point to its assigned centroid
    """

    centroids: Tensor
    assignments: Tensor
    inertia: float
    n_iter_run: int
    distances: Tensor | None = None


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _assign(x: Tensor, c: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid and squared distance for every row of x; never more than chunk x k distances."""
    n = x.shape[0]
    c2 = (c * c).sum(1)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        xb = x[s:s + chunk]
        d = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ c.T) + c2
        m, i = d.min(1)
        labels[s:s + chunk] = i
        dists[s:s + chunk] = m.clamp_min_(0)
    return labels, dists


def _sqdist_to(x: Tensor, pts: Tensor) -> Tensor:
    """(M, P) squared distances of x (M, D) to a few points pts (P, D)."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * (x @ pts.T) + (pts * pts).sum(1)).clamp_min_(0)


def _kmeanspp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ on x (M, D); randomness from the CPU generator ``gen``."""
    m = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=gen))
    centers[0] = x[first]
    closest = _sqdist_to(x, x[first:first + 1])[:, 0]
    pot = closest.sum()
    for j in range(1, k):
        cum = torch.cumsum(closest, 0)
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        cand = torch.searchsorted(cum, r * pot).clamp_(max=m - 1)
        new = torch.minimum(closest[:, None], _sqdist_to(x, x[cand]))  # (M, trials)
        pots = new.sum(0)
        best = int(pots.argmin())
        centers[j] = x[cand[best]]
        closest = new[:, best].contiguous()
        pot = pots[best]
    return centers


def _init_centroids(x: Tensor, k: int, init: str | Tensor, gen: torch.Generator,
                    init_sample: int | None) -> Tensor:
    n = x.shape[0]
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init centroids must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        return init.to(device=x.device, dtype=x.dtype).clone()
    if init == "random":
        idx = torch.randperm(n, generator=gen)[:k].to(x.device)
        return x[idx].clone()
    if init == "k-means++":
        m = init_sample if init_sample is not None else max(100_000, 64 * k)
        xs = x
        if n > m:
            xs = x[torch.randperm(n, generator=gen)[:max(m, k)].to(x.device)]
        return _kmeanspp(xs, k, gen)
    raise ValueError(f"unknown init {init!r}; expected 'k-means++', 'random' or a (k, D) tensor")


def _update(x: Tensor, labels: Tensor, dists: Tensor, k: int, spherical: bool) -> tuple[Tensor, int]:
    """New centroids as cluster means; empty clusters take the farthest points. Returns (centroids, n_empty)."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        labels = labels.clone()
        far = torch.argsort(dists, descending=True, stable=True)[:empty.numel()]
        labels[far] = empty[:far.numel()]
        counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    c = sums / counts.clamp_min(1).to(x.dtype)[:, None]
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    return c, int(empty.numel())


def kmeans(
    x: Tensor,
    k: int,
    *,
    n_iter: int = 20,
    init: str | Tensor = "k-means++",
    seed: int = 0,
    chunk: int = 65536,
    device: str | torch.device | None = None,
    spherical: bool = False,
    progress: bool = False,
    init_sample: int | None = None,
    backend: str = "torch",
) -> KMeansResult:
    """Lloyd's k-means of ``x`` (N, D) into ``k`` clusters (see the module docstring).

    Computation runs on ``device`` (default: x's device) in float64 for float64 input, else float32.
    The returned ``assignments``/``distances``/``inertia`` are those of the returned centroids.
    ``progress`` logs the number of changed assignments at every iteration (logger ``INFO``).
    ``backend``: ``"torch"`` or ``"faiss"`` (float32 on the CPU; needs faiss-cpu).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    dev = torch.device(device) if device is not None else x.device
    x = x.to(device=dev, dtype=_work_dtype(x))
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(seed)
    c = _init_centroids(x, k, init, gen, init_sample)
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1)
    if backend == "faiss":
        return _kmeans_faiss(x, c, n_iter=n_iter, seed=seed, spherical=spherical, progress=progress)

    prev: Tensor | None = None
    it = 0
    labels, dists = _assign(x, c, chunk)
    while True:
        if prev is not None and torch.equal(labels, prev):
            break
        if it >= n_iter:
            break
        c, n_empty = _update(x, labels, dists, k, spherical)
        it += 1
        prev = labels
        labels, dists = _assign(x, c, chunk)
        if progress:
            changed = int((labels != prev).sum())
            logger.info("kmeans k=%d iter %d: %d assignments changed, %d empty re-seeded, inertia %.6g",
                        k, it, changed, n_empty, float(dists.sum()))
    return KMeansResult(centroids=c, assignments=labels, inertia=float(dists.sum()), n_iter_run=it,
                        distances=dists)


def _kmeans_faiss(x: Tensor, init: Tensor, *, n_iter: int, seed: int, spherical: bool,
                  progress: bool) -> KMeansResult:
    """faiss k-means from the centroids ``init``; the result is moved back to x's device."""
    from dinolab.curate.faiss_index import import_faiss

    faiss = import_faiss()
    xn = np.ascontiguousarray(x.detach().float().cpu().numpy())
    k, d = init.shape
    km = faiss.Kmeans(d, k, niter=n_iter, seed=seed, spherical=spherical, verbose=progress,
                      max_points_per_centroid=max(1, -(-xn.shape[0] // k)), min_points_per_centroid=1)
    km.train(xn, init_centroids=np.ascontiguousarray(init.detach().float().cpu().numpy()))
    dist, labels = km.index.search(xn, 1)  # squared L2 to the final centroids
    dist_t = torch.from_numpy(dist[:, 0]).clamp_min_(0).to(x.device)
    return KMeansResult(centroids=torch.from_numpy(km.centroids).to(x.device, x.dtype),
                        assignments=torch.from_numpy(labels[:, 0].astype(np.int64)).to(x.device),
                        inertia=float(dist_t.double().sum()), n_iter_run=n_iter, distances=dist_t.to(x.dtype))


def hierarchical_kmeans(
    x: Tensor,
    ks: Sequence[int],
    *,
    n_iter: int = 20,
    seed: int = 0,
    device: str | torch.device | None = None,
    init: str = "k-means++",
    chunk: int = 65536,
    spherical: bool = False,
    progress: bool = False,
    backend: str = "torch",
) -> list[KMeansResult]:
    """Hierarchical k-means (Vo et al. 2024): ``ks`` from the finest level to the coarsest, e.g. [1000, 100, 10].

    ``result[0]`` clusters the N points; ``result[l]`` clusters the ``ks[l-1]`` centroids of
    ``result[l-1]`` (its ``assignments`` has length ``ks[l-1]``). Level l uses seed ``seed + l``.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must not be empty")
    if any(b > a for a, b in itertools.pairwise(ks)):
        raise ValueError(f"ks must be non-increasing (finest level first), got {ks}")
    levels: list[KMeansResult] = []
    data = x
    for lvl, k in enumerate(ks):
        res = kmeans(data, k, n_iter=n_iter, init=init, seed=seed + lvl, chunk=chunk, device=device,
                     spherical=spherical, progress=progress, backend=backend)
        levels.append(res)
        data = res.centroids
    return levels


def point_assignments(levels: Sequence[KMeansResult]) -> list[Tensor]:
    """For each level, the (N,) cluster index of every point of level 1 (composes the tree's parent maps)."""
    out: list[Tensor] = []
    cur: Tensor | None = None
    for res in levels:
        cur = res.assignments if cur is None else res.assignments[cur]
        out.append(cur)
    return out
