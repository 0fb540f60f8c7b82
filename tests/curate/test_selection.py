"""Retrieval-based selection against brute-force neighbours (scikit-learn) and planted clusters."""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from dinolab.curate.selection import select_by_retrieval
from dinolab.errors import DinolabError

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(seed=0, k=10, per=100, d=32):
    """``k`` well-separated directions (the cosine geometry the pipeline uses), ``per`` points each."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4
    y = np.repeat(np.arange(k), per)
    pool = centers[y] + rng.normal(size=(y.size, d))
    seeds_y = np.repeat([0, 1], 10)
    seeds = centers[seeds_y] + rng.normal(size=(seeds_y.size, d))
    return pool.astype(np.float32), y, seeds.astype(np.float32)


def test_sample_mode_equals_brute_force_neighbours():
    pool, y, seeds = _blobs()
    res = select_by_retrieval(pool, seeds, mode="sample", k=5)
    nn = NearestNeighbors(n_neighbors=5, metric="cosine").fit(pool)
    dist, idx = nn.kneighbors(seeds)
    np.testing.assert_array_equal(res.selected, np.unique(idx))
    np.testing.assert_array_equal(res.hits, np.bincount(idx.ravel(), minlength=len(pool)))
    assert res.mode == "sample" and set(y[res.selected]) <= {0, 1}
    # min_similarity keeps only neighbours at least that close
    cut = float(np.median(1 - dist))
    res = select_by_retrieval(pool, seeds, mode="sample", k=5, min_similarity=cut)
    np.testing.assert_array_equal(res.selected, np.unique(idx[(1 - dist) >= cut - 1e-6]))


def test_cluster_mode_keeps_whole_seed_clusters():
    pool, y, seeds = _blobs()
    res = select_by_retrieval(pool, seeds, mode="cluster", k=3, n_clusters=10, seed=0)
    assert res.mode == "cluster" and res.clusters.size == 2
    np.testing.assert_array_equal(res.selected, np.flatnonzero(y <= 1))  # the two seed blobs, whole
    assert res.cluster_hits.sum() == 20 * 3 and (res.cluster_hits > 0).sum() == 2
    capped = select_by_retrieval(pool, seeds, mode="cluster", k=3, n_clusters=10, per_cluster=30, seed=0)
    assert np.bincount(y[capped.selected], minlength=10).tolist() == [30, 30] + [0] * 8
    again = select_by_retrieval(pool, seeds, mode="cluster", k=3, n_clusters=10, per_cluster=30, seed=0)
    np.testing.assert_array_equal(capped.selected, again.selected)  # deterministic for a seed
    # min_hits: a cluster needs that many votes
    few = select_by_retrieval(pool, seeds[:1], mode="cluster", k=3, n_clusters=10, min_hits=4)
    assert few.selected.size == 0


def test_auto_mode_and_base_rate():
    pool, y, seeds = _blobs(seed=1)
    assert select_by_retrieval(pool, seeds, k=4).mode == "sample"
    res = select_by_retrieval(pool, seeds, k=4, cluster_above=5, n_clusters=10)
    assert res.mode == "cluster"
    assert np.isin(y[res.selected], [0, 1]).mean() == 1.0  # vs the 20% base rate of the pool


def test_selection_errors():
    pool, _, seeds = _blobs()
    with pytest.raises(DinolabError, match="same model"):
        select_by_retrieval(pool, seeds[:, :16])
    with pytest.raises(DinolabError, match="non-empty"):
        select_by_retrieval(pool, seeds[:0])
    with pytest.raises(DinolabError, match="unknown selection mode"):
        select_by_retrieval(pool, seeds, mode="random")
    with pytest.raises(DinolabError, match="n_clusters"):
        select_by_retrieval(pool, seeds, mode="cluster", n_clusters=5000)
