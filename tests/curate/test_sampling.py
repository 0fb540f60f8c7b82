"""Balanced hierarchical sampling (Vo et al. 2024)."""

import numpy as np
import pytest
import torch

from dinolab.curate.kmeans import KMeansResult, hierarchical_kmeans
from dinolab.curate.sampling import balanced_sample, water_fill

pytestmark = pytest.mark.usefixtures("one_thread")

TAIL = [2000, 1000, 500, 250, 125, 64, 32, 16, 10, 10]


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / labels.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _long_tail(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(TAIL), 16)) * 10.0
    y = np.repeat(np.arange(len(TAIL)), TAIL)
    x = means[y] + rng.normal(size=(y.size, 16))
    return torch.from_numpy(x).float(), y


def _result(assign, k):
    a = torch.as_tensor(assign, dtype=torch.long)
    return KMeansResult(centroids=torch.zeros(k, 2), assignments=a, inertia=0.0, n_iter_run=0)


def test_water_fill_exact():
    assert water_fill([1, 5, 10], 12).tolist() == [1, 5, 6]
    assert water_fill([1, 5, 10], 3).tolist() == [1, 1, 1]
    assert water_fill([1, 5, 10], 100).tolist() == [1, 5, 10]
    assert water_fill([2, 2, 9, 9], 14).tolist() == [2, 2, 5, 5]
    assert water_fill([0, 4], 3).tolist() == [0, 3]
    # remainder: one extra point to one of the children with room left
    c = water_fill([1, 5, 10], 10, np.random.default_rng(0))
    assert c.sum() == 10 and c[0] == 1 and sorted(c[1:].tolist()) == [4, 5]


def test_balanced_sample_hand_tree():
    # 12 points in 4 leaf clusters of sizes 1, 2, 3, 6; leaves {0,1} and {2,3} form 2 top clusters
    leaf = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3])
    levels = [_result(leaf, 4), _result([0, 0, 1, 1], 2)]
    for seed in range(5):
        idx = balanced_sample(levels, 6, seed=seed)
        # top: sizes (3, 9) -> 3 + 3; left takes all of leaves 0, 1; right: sizes (3, 6), budget 3 -> 2 + 1 (or 1 + 2)
        counts = np.bincount(leaf[idx], minlength=4)
        assert counts[:2].tolist() == [1, 2]
        assert sorted(counts[2:].tolist()) == [1, 2]
        assert len(set(idx.tolist())) == 6
    assert balanced_sample(levels, 8).tolist() == balanced_sample(levels, 8).tolist()
    counts = np.bincount(leaf[balanced_sample(levels, 8)], minlength=4)
    assert counts.tolist() == [1, 2, 2, 3]  # right: budget 5 over sizes (3, 6) -> 2 + 3
    assert balanced_sample(levels, 100).tolist() == list(range(12))
    assert balanced_sample(levels, 0).size == 0


def test_closest_strategy_picks_nearest():
    res = _result([0, 0, 0, 1, 1, 1], 2)
    res.distances = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.1, 9.0])
    idx = balanced_sample([res], 4, strategy="closest")
    assert idx.tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        balanced_sample([_result([0, 1], 2)], 1, strategy="closest")


def test_balanced_sample_flattens_long_tail():
    x, y = _long_tail()
    levels = hierarchical_kmeans(x, [40, 10], n_iter=20, seed=0)
    n = 500
    rng = np.random.default_rng(0)
    h_uniform = np.mean([_entropy(y[rng.choice(y.size, n, replace=False)]) for _ in range(5)])
    h_balanced = np.mean([_entropy(y[balanced_sample(levels, n, seed=s)]) for s in range(3)])
    h_closest = _entropy(y[balanced_sample(levels, n, strategy="closest")])
    h_max = np.log(len(TAIL))
    assert h_balanced > h_uniform + 0.4, (h_balanced, h_uniform)
    assert h_closest > h_uniform + 0.4, (h_closest, h_uniform)
    assert h_balanced > 0.85 * h_max
    idx = balanced_sample(levels, n, seed=1)
    assert idx.size == n and np.unique(idx).size == n
    assert np.array_equal(idx, balanced_sample(levels, n, seed=1))
    # every tail cluster (10 points) is fully represented
    assert (np.bincount(y[idx], minlength=10)[-2:] == 10).all()
