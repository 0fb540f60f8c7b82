"""faiss indexes: save/load of every kind, exact vs approximate agreement, size-based choice, errors."""

import sys

import numpy as np
import pytest
import torch

from dinolab.curate.index import ExactIndex, load_index, make_index
from dinolab.errors import DinolabError

faiss = pytest.importorskip("faiss")
from dinolab.curate.faiss_index import (
    FaissIndex,
    choose_kind,
    default_nlist,
    default_pq_m,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _faiss_one_thread():
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def _clustered(n, d=64, n_centers=100, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, d))
    return (centers[rng.integers(0, n_centers, n)] + rng.normal(size=(n, d)) * noise).astype(np.float32)


def _overlap(approx, exact):
    """Mean fraction of the exact top-k found in the approximate top-k (10-recall@10)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(approx.tolist(), exact.tolist())]))


def test_defaults_by_hand():
    assert choose_kind(1000) == "exact" and choose_kind(1_000_000) == "exact"
    assert choose_kind(1_000_001) == "ivf" and choose_kind(20_000_001) == "ivfpq"
    assert default_nlist(20_000) == 512  # 4 sqrt(20000) = 566 -> 512 (= 20000 // 39)
    assert default_nlist(1_000_000) == 4096  # 4000 -> 4096
    assert default_nlist(1000) == 25  # 126 -> 128, capped at 1000 // 39
    assert default_pq_m(384) == 96 and default_pq_m(64) == 16 and default_pq_m(30) == 6
    assert make_index(np.ones((3, 4)), kind="auto").kind == "exact"


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    x = _clustered(3000, d=32, n_centers=20, seed=1)
    ids = [f"dir/img {i}.jpg" for i in range(len(x))]
    kw = {} if kind in ("exact", "flat") else {"nlist": 16} if kind != "hnsw" else {"hnsw_m": 16}
    index = make_index(x, ids, "vit_tiny", kind=kind, info={"resize": 32, "crop": 32}, **kw)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert type(loaded) is type(index) and loaded.kind == kind
    assert loaded.ids == ids and loaded.model_id == "vit_tiny" and loaded.info == {"resize": 32, "crop": 32}
    assert len(loaded) == 3000 and loaded.dim == 32
    q = _clustered(20, d=32, n_centers=20, seed=2)
    s0, i0 = index.search(q, 7)
    s1, i1 = loaded.search(q, 7)
    assert torch.equal(i0, i1) and torch.equal(s0, s1)  # same vectors, same search code: bit-identical
    rows = [0, 5, 2999]
    v = loaded.vectors(rows).numpy()
    unit = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
    atol = 0.25 if kind == "ivfpq" else 1e-6  # PQ decodes compressed codes
    np.testing.assert_allclose(v, unit, atol=atol)


def test_approximate_agrees_with_exact():
    """Stated setting: 20,000 x 64 vectors around 100 Gaussian centres (noise std 1 per dim), 500 queries."""
    x = _clustered(20_500)
    db, q = x[:20_000], x[20_000:]
    _, exact = ExactIndex(db).search(q, 10)
    flat_s, flat = FaissIndex(db, kind="flat").search(q, 10)
    assert _overlap(flat.numpy(), exact.numpy()) == 1.0
    ivf = FaissIndex(db, kind="ivf", nlist=128, nprobe=16)
    assert _overlap(ivf.search(q, 10)[1].numpy(), exact.numpy()) >= 0.95
    narrow = _overlap(ivf.search(q, 10, nprobe=1)[1].numpy(), exact.numpy())
    assert narrow < 0.97  # nprobe is really applied: one cell misses neighbours across cell borders
    hnsw = FaissIndex(db, kind="hnsw", hnsw_m=32, ef_search=128)
    assert _overlap(hnsw.search(q, 10)[1].numpy(), exact.numpy()) >= 0.95
    # scores are cosine similarities
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(flat_s[:, 0].numpy(), (qn @ dn.T).max(1), atol=1e-5)


def test_ivfpq_compressed_but_useful():
    x = _clustered(6000, d=64, n_centers=30, seed=3)
    db, q = x[:5800], x[5800:]
    _, exact = ExactIndex(db).search(q, 10)
    pq = FaissIndex(db, kind="ivfpq", nlist=32, nprobe=32)
    assert pq.factory.startswith("IVF32,PQ16x")
    assert pq.index.code_size <= 16  # 16 codes of <= 8 bits a vector instead of 256 bytes
    assert _overlap(pq.search(q, 10)[1].numpy(), exact.numpy()) >= 0.3  # far above the 10/5800 of chance


def test_errors(tmp_path, monkeypatch):
    x = _clustered(100, d=8, n_centers=4)
    with pytest.raises(DinolabError, match="unknown index kind"):
        make_index(x, kind="lsh")
    with pytest.raises(DinolabError, match="only apply to faiss"):
        make_index(x, kind="exact", nprobe=4)
    with pytest.raises(DinolabError, match="must divide"):
        FaissIndex(x, kind="ivfpq", nlist=2, pq_m=3)
    with pytest.raises(DinolabError, match="more than"):
        FaissIndex(x, kind="ivf", nlist=500)
    index = FaissIndex(x, kind="flat")
    with pytest.raises(DinolabError, match=r"queries must be \(M, 8\)"):
        index.search(np.ones((2, 5)), 3)
    with pytest.raises(DinolabError, match="no meta.json"):
        load_index(tmp_path / "nothing")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(DinolabError, match="pip install faiss-cpu"):
        make_index(x, kind="hnsw")
