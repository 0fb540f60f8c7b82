"""k-means and hierarchical k-means against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from dinolab.curate.kmeans import hierarchical_kmeans, kmeans, point_assignments

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n=3000, k=8, d=16, seed=0, std=2.0):
    x, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, random_state=seed)
    return torch.from_numpy(x), y


def test_same_init_matches_sklearn():
    x, _ = _blobs(std=4.0)
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:8]].clone()
    ours = kmeans(x, 8, init=init, n_iter=100)
    sk = KMeans(8, init=init.numpy(), n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x.numpy())
    np.testing.assert_array_equal(ours.assignments.numpy(), sk.labels_)
    np.testing.assert_allclose(ours.centroids.numpy(), sk.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert ours.inertia == pytest.approx(sk.inertia_, rel=1e-9)
    assert ours.n_iter_run <= 100


def test_kmeanspp_close_to_sklearn_best_of_10():
    # separated blobs: one seeded k-means++ run reaches sklearn's best of 10 inits
    x, _ = _blobs(k=10, std=1.5, seed=3)
    sk = KMeans(10, n_init=10, random_state=0).fit(x.numpy())
    for seed in range(3):
        ours = kmeans(x, 10, n_iter=100, seed=seed)
        assert ours.inertia <= 1.05 * sk.inertia_
    # results are reproducible from the seed
    assert torch.equal(kmeans(x, 10, n_iter=100, seed=2).assignments, ours.assignments)


def test_kmeanspp_best_of_seeds_overlapping_blobs():
    # overlapping blobs: single runs (ours and sklearn's) hit local minima; best of 10 seeds matches
    x, _ = _blobs(k=10, std=3.0, seed=3)
    sk = KMeans(10, n_init=10, random_state=0).fit(x.numpy())
    best = min(kmeans(x, 10, n_iter=100, seed=s).inertia for s in range(10))
    assert best <= 1.01 * sk.inertia_


def test_inertia_and_distances_consistent():
    x, _ = _blobs()
    res = kmeans(x.float(), 8, n_iter=30)
    assert res.centroids.shape == (8, 16) and res.assignments.shape == (3000,)
    d = ((x.float() - res.centroids[res.assignments]) ** 2).sum(1)
    torch.testing.assert_close(res.distances, d, rtol=1e-3, atol=1e-2)
    assert res.inertia == pytest.approx(float(d.sum()), rel=1e-4)


def test_chunked_equals_unchunked():
    x, _ = _blobs(n=2000)
    full = kmeans(x, 8, chunk=10**6, n_iter=50)
    # Chunking changes the shape of the ``x @ c.T`` products, so BLAS may pick another kernel and
    # accumulation order: each squared distance |x|^2 - 2 x.c + |c|^2 can move by a few float64 ulps
    # of |x|^2 + |c|^2 (measured: up to 4.5e-13 at chunk=1, inertia 1.5e-11 apart). Bound: 8 eps per
    # term of that sum, plus N eps of the inertia for summing N terms in another order.
    eps = torch.finfo(torch.float64).eps
    scale = ((x * x).sum(1) + (full.centroids[full.assignments] ** 2).sum(1))
    d_tol = 8 * eps * float(scale.max())
    inertia_tol = 8 * eps * float(scale.sum()) + x.shape[0] * eps * full.inertia
    # Assignments are discrete: they can differ only if a point's two nearest centroids are closer in
    # distance than the rounding; check that this data has no such near-tie, then require equality.
    d_all = torch.cdist(x, full.centroids) ** 2
    two = d_all.topk(2, dim=1, largest=False).values
    assert float((two[:, 1] - two[:, 0]).min()) > 100 * d_tol
    for chunk in (1, 7, 256):
        part = kmeans(x, 8, chunk=chunk, n_iter=50)
        assert torch.equal(part.assignments, full.assignments)
        assert part.n_iter_run == full.n_iter_run
        # centroids are means over the same assignments by the same code path (no chunking there):
        # bit-identical, not merely close
        assert torch.equal(part.centroids, full.centroids)
        torch.testing.assert_close(part.distances, full.distances, rtol=0, atol=d_tol)
        assert part.inertia == pytest.approx(full.inertia, rel=0, abs=inertia_tol)


def test_empty_cluster_reseeded_from_farthest():
    # two groups and two outliers; two initial centroids lie far away and get no points at first
    g = torch.Generator().manual_seed(0)
    a = 0.1 * torch.randn(50, 2, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(50, 2, generator=g, dtype=torch.float64) + 10.0
    x = torch.cat([a, b, torch.tensor([[30.0, 30.0], [-30.0, 30.0]], dtype=torch.float64)])
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-500.0, -500.0], [500.0, -800.0]], dtype=torch.float64)
    res = kmeans(x, 4, init=init, n_iter=10)
    counts = torch.bincount(res.assignments, minlength=4)
    assert sorted(counts.tolist()) == [1, 1, 50, 50]
    for i in (100, 101):  # each outlier was moved into a re-seeded cluster of its own
        assert res.assignments[i] in (2, 3)
        torch.testing.assert_close(res.centroids[res.assignments[i]], x[i])
    assert res.assignments[100] != res.assignments[101]
    assert (res.assignments[:50] == 0).all() and (res.assignments[50:100] == 1).all()


def test_spherical_unit_centroids():
    x, _ = _blobs()
    res = kmeans(x, 8, spherical=True)
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(8, dtype=res.centroids.dtype))


def test_bad_args():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError):
        kmeans(x, 6)
    with pytest.raises(ValueError):
        kmeans(x, 2, init="nope")
    with pytest.raises(ValueError):
        hierarchical_kmeans(x, [2, 3])


def test_hierarchical_tree():
    x, _ = _blobs(n=2000, k=10)
    levels = hierarchical_kmeans(x.float(), [40, 10, 3], n_iter=20)
    assert [r.centroids.shape for r in levels] == [(40, 16), (10, 16), (3, 16)]
    assert [r.assignments.shape[0] for r in levels] == [2000, 40, 10]
    per_level = point_assignments(levels)
    assert [a.shape for a in per_level] == [(2000,)] * 3
    for lvl in range(1, 3):
        # a point's level-l cluster is the parent of its level-(l-1) cluster
        assert torch.equal(per_level[lvl], levels[lvl].assignments[per_level[lvl - 1]])
        assert int(per_level[lvl].max()) < levels[lvl].centroids.shape[0]


def test_faiss_backend_same_init_matches_torch_and_sklearn():
    pytest.importorskip("faiss")
    x, _ = _blobs(std=4.0)
    x = x.float()
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:8]].clone()
    ours = kmeans(x, 8, init=init, n_iter=50)
    fa = kmeans(x, 8, init=init, n_iter=50, backend="faiss")
    sk = KMeans(8, init=init.numpy(), n_init=1, max_iter=50, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert (fa.assignments == ours.assignments).float().mean() > 0.999
    assert fa.inertia == pytest.approx(sk.inertia_, rel=1e-4) and ours.inertia == pytest.approx(sk.inertia_, rel=1e-4)
    torch.testing.assert_close(fa.distances, ((x - fa.centroids[fa.assignments]) ** 2).sum(1), rtol=1e-3, atol=1e-2)
    levels = hierarchical_kmeans(x, [20, 4], n_iter=10, backend="faiss")
    assert [r.centroids.shape for r in levels] == [(20, 16), (4, 16)]
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, backend="sklearn")
