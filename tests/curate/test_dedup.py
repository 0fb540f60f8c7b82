import numpy as np
import pytest

from dinolab.curate.dedup import find_duplicates, remove_near_eval
from dinolab.errors import DinolabError

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(seed=0, n=300, d=64, n_dup=30):
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n, d)))
    src = rng.choice(n, n_dup, replace=False)
    copies = _unit(base[src] + rng.normal(size=(n_dup, d)) * 0.01)
    assert (np.sum(copies * base[src], axis=1) > 0.98).all()
    feats = np.concatenate([base, copies]).astype(np.float32)
    perm = rng.permutation(len(feats))  # copies are not simply at the end
    inv = np.argsort(perm)
    feats = feats[perm]
    pairs = {tuple(sorted((int(inv[s]), int(inv[n + j])))) for j, s in enumerate(src)}
    return feats, pairs


@pytest.mark.parametrize("chunk", [4096, 17])
def test_planted_duplicates(chunk):
    feats, planted = _planted()
    res = find_duplicates(feats, threshold=0.95, k=8, chunk=chunk)
    comps = {tuple(c.tolist()) for c in res.components}
    assert comps == planted  # every planted pair, no false merges among distinct base vectors
    assert {tuple(p) for p in res.pairs.tolist()} == planted
    assert (res.similarities > 0.98).all()
    assert res.keep.sum() == len(feats) - len(planted) and res.n_removed == len(planted)
    for c in res.components:
        assert res.keep[c].sum() == 1 and res.keep[c.min()]
    others = np.setdiff1d(np.arange(len(feats)), np.concatenate(res.components))
    assert res.keep[others].all()


def test_transitive_chain_is_one_component():
    rng = np.random.default_rng(1)
    d = 64
    a, b = _unit(rng.normal(size=(2, d)))
    b = b - (b @ a) * a
    b /= np.linalg.norm(b)  # orthogonal to a
    angles = np.linspace(0, 0.8, 9)  # consecutive cos = cos(0.1) > 0.99; ends cos(0.8) ~ 0.70
    chain = np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * b
    others = _unit(rng.normal(size=(50, d)))
    feats = np.concatenate([others[:20], chain, others[20:]])
    res = find_duplicates(feats, threshold=0.99, k=2)
    assert len(res.components) == 1
    np.testing.assert_array_equal(res.components[0], np.arange(20, 29))
    assert res.keep.sum() == len(feats) - 8 and res.keep[20]


def test_no_duplicates_and_empty():
    rng = np.random.default_rng(2)
    res = find_duplicates(rng.normal(size=(40, 64)), threshold=0.9)
    assert res.components == [] and res.keep.all() and res.pairs.shape == (0, 2)
    res = find_duplicates(np.zeros((0, 8)))
    assert res.keep.shape == (0,) and res.components == []


def test_remove_near_eval_drops_planted_leaks():
    rng = np.random.default_rng(3)
    pool = _unit(rng.normal(size=(200, 64)))
    ev = _unit(rng.normal(size=(40, 64)))
    leak_rows = rng.choice(200, 12, replace=False)
    pool[leak_rows] = _unit(ev[rng.choice(40, 12, replace=False)] + rng.normal(size=(12, 64)) * 0.01)
    keep = remove_near_eval(pool, ev, threshold=0.95, chunk=16)
    assert keep.dtype == bool and keep.shape == (200,)
    np.testing.assert_array_equal(np.flatnonzero(~keep), np.sort(leak_rows))
    assert remove_near_eval(pool, ev[:0], threshold=0.95).all()


@pytest.mark.parametrize("method", ["cluster", "ivf", "hnsw"])
def test_approximate_methods_find_the_same_pairs(method):
    if method != "cluster":
        pytest.importorskip("faiss")
    feats, planted = _planted(n=2000, n_dup=60)
    exact = find_duplicates(feats, threshold=0.95, k=8)
    approx = find_duplicates(feats, threshold=0.95, k=8, method=method, nlist=16, nprobe=4, chunk=500)
    assert {tuple(p) for p in exact.pairs.tolist()} == planted
    assert {tuple(p) for p in approx.pairs.tolist()} == planted
    np.testing.assert_array_equal(approx.keep, exact.keep)
    np.testing.assert_allclose(approx.similarities, exact.similarities, atol=1e-5)
    with pytest.raises(DinolabError, match="unknown dedup method"):
        find_duplicates(feats, method="lsh")


def test_cluster_method_probes_neighbouring_clusters():
    """Pairs split across two k-means cells are missed with nprobe=1 and found with nprobe=2."""
    rng = np.random.default_rng(4)
    d = 16
    centres = _unit(rng.normal(size=(2, d)))
    mid = _unit((centres[0] + centres[1])[None])[0]  # on the border between the two cells
    pts = [_unit(centres[i] + rng.normal(size=(200, d)) * 0.05) for i in range(2)]
    side = _unit((centres[1] - centres[0])[None])[0]
    pair = _unit(np.stack([mid - 0.02 * side, mid + 0.02 * side]))  # cos > 0.99, one on each side
    feats = np.concatenate([pts[0], pts[1], pair]).astype(np.float32)
    one = find_duplicates(feats, threshold=0.99, k=4, method="cluster", nlist=2, nprobe=1)
    two = find_duplicates(feats, threshold=0.99, k=4, method="cluster", nlist=2, nprobe=2)
    exact = find_duplicates(feats, threshold=0.99, k=4)
    assert [400, 401] in exact.pairs.tolist() and [400, 401] in two.pairs.tolist()
    assert [400, 401] not in one.pairs.tolist()
    assert {tuple(p) for p in two.pairs.tolist()} == {tuple(p) for p in exact.pairs.tolist()}
