import numpy as np
import pytest
import torch

from dinolab.curate.index import (
    ExactIndex,
    average_precision,
    mean_average_precision,
    recall_at_k,
    topk_cosine,
)
from dinolab.errors import DinolabError

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute(q, db, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    sims = qn @ dn.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("qc,dc", [(1024, 65536), (3, 7), (1, 1), (5, 200)])
def test_search_matches_bruteforce(qc, dc):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(200, 16)).astype(np.float32)
    q = rng.normal(size=(23, 16)).astype(np.float32)
    index = ExactIndex(db, [f"img{i}" for i in range(200)], model_id="vits14")
    s, i = index.search(q, 10, query_chunk=qc, db_chunk=dc)
    bs, bi = _brute(q.astype(np.float64), db.astype(np.float64), 10)
    assert s.shape == (23, 10) and i.dtype == torch.int64
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(s.numpy(), bs, atol=1e-5)
    assert index.ids_of(i[0, :2]) == [f"img{j}" for j in bi[0, :2]]
    assert index.ids_of(i)[3][4] == f"img{bi[3, 4]}"


def test_k_larger_than_db_and_self_query():
    rng = np.random.default_rng(1)
    db = rng.normal(size=(5, 8))
    s, i = topk_cosine(db, db, 50, query_chunk=2, db_chunk=2)
    assert i.shape == (5, 5)
    np.testing.assert_array_equal(i[:, 0].numpy(), np.arange(5))
    np.testing.assert_allclose(s[:, 0].numpy(), 1.0, atol=1e-6)


def test_bad_inputs():
    index = ExactIndex(np.ones((3, 4)), model_id="m")
    with pytest.raises(DinolabError):
        index.search(np.ones((2, 5)), 1)
    with pytest.raises(DinolabError):
        ExactIndex(np.ones((3, 4)), ["a", "b"])
    with pytest.raises(DinolabError):
        ExactIndex.load("/nonexistent/index")


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    db = rng.normal(size=(50, 12)).astype(np.float32)
    ids = [f"a/b c_{i}.jpg" for i in range(50)]
    index = ExactIndex(db, ids, model_id="dinov2_vits14")
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["features.npy", "ids.txt", "meta.json"]
    q = rng.normal(size=(7, 12))
    for mmap in (False, True):
        loaded = ExactIndex.load(tmp_path / "idx", mmap=mmap)
        assert loaded.ids == ids and loaded.model_id == "dinov2_vits14"
        assert loaded.dim == 12 and len(loaded) == 50
        s0, i0 = index.search(q, 5)
        s1, i1 = loaded.search(q, 5)
        torch.testing.assert_close(s0, s1, rtol=0, atol=0)
        torch.testing.assert_close(i0, i1, rtol=0, atol=0)
        assert loaded.ids_of(i1) == index.ids_of(i0)


def test_average_precision_hand():
    # relevant at ranks 1, 3: (1/1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([1, 0, 1, 0], n_relevant=4) == pytest.approx((1 + 2 / 3) / 4)
    assert average_precision([0, 0]) == 0.0


def test_map_and_recall_hand():
    # database labels; queries are the database rows (leave-one-out)
    db_labels = np.array([0, 0, 1, 1, 0])
    indices = np.array([
        [0, 2, 1, 4],  # query 0 (label 0): self dropped -> [2,1,4] rel [0,1,1]; n_rel=2
        [1, 3, 2, 0],  # query 1 (label 0): -> [3,2,0] rel [0,0,1]; n_rel=2
        [2, 3, 0, 1],  # query 2 (label 1): -> [3,0,1] rel [1,0,0]; n_rel=1
        [2, 3, 4, 1],  # query 3 (label 1): self at rank 2 -> [2,4,1] rel [1,0,0]; n_rel=1
        [4, 1, 0, 2],  # query 4 (label 0): -> [1,0,2] rel [1,1,0]; n_rel=2
    ])
    ap = [(1 / 2 + 2 / 3) / 2, (1 / 3) / 2, 1.0, 1.0, 1.0]
    assert mean_average_precision(indices, db_labels, db_labels) == pytest.approx(np.mean(ap))
    r = recall_at_k(indices, db_labels, db_labels, [1, 2, 3])
    assert r == pytest.approx({1: 3 / 5, 2: 4 / 5, 3: 1.0})
    assert recall_at_k(indices, db_labels, db_labels, 1) == pytest.approx(3 / 5)
    # separate query set: nothing excluded
    q_labels = np.array([0, 1, 1, 0, 0])
    assert recall_at_k(indices, q_labels, db_labels, 1, exclude_self=False) == pytest.approx(3 / 5)
    # query 0 with self kept: list [0,2,1,4] rel [1,0,1,1], n_rel 3 -> (1 + 2/3 + 3/4) / 3
    m = mean_average_precision(indices[:1], [0], db_labels, exclude_self=False)
    assert m == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_map_with_search_perfect_clusters():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 32)) * 10
    labels = np.repeat(np.arange(4), 10)
    x = centers[labels] + rng.normal(size=(40, 32)) * 0.1
    _, i = ExactIndex(x).search(x, 11, db_chunk=7)
    assert mean_average_precision(i, labels, labels) == pytest.approx(1.0)
    assert recall_at_k(i, labels, labels, 1) == 1.0
