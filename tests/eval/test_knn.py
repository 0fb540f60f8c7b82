"""kNN protocol: exact parity with scikit-learn, chunking invariance, clipping, hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinolab.errors import DinolabError
from dinolab.eval.knn import knn_classify

T = 0.07


def _clustered(n_train=500, n_test=200, dim=16, classes=5, noise=2.0, seed=0):
    """Gaussian clusters around random unit centres, noisy enough that kNN makes mistakes (float64)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def sample(n):
        y = rng.integers(0, classes, n)
        return centres[y] + noise * rng.normal(size=(n, dim)) / math.sqrt(dim), y

    (xtr, ytr), (xte, yte) = sample(n_train), sample(n_test)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte)


@pytest.fixture(scope="module")
def data():
    return _clustered()


def test_predictions_equal_sklearn(data):
    """Same neighbours, same weights, same argmax as scikit-learn's brute-force cosine kNN.

    Features are float64 (so we compute in float64, as scikit-learn does): near-ties in summed
    class weight can then not be flipped by float32 rounding.
    """
    neighbors = pytest.importorskip("sklearn.neighbors")
    xtr, ytr, xte, yte = data
    result = knn_classify(xtr, ytr, xte, test_labels=yte, num_classes=5, ks=(1, 5, 20), temperature=T,
                          device="cpu")
    for k in (1, 5, 20):
        sk = neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                            weights=lambda d: np.exp((1 - d) / T))
        expected = sk.fit(xtr.numpy(), ytr.numpy()).predict(xte.numpy())
        assert torch.equal(result.predictions[k], torch.from_numpy(expected))
        assert result.top1[k] == pytest.approx(100 * np.mean(expected == yte.numpy()))
    assert 50 < result.top1[20] < 100  # the problem is neither trivial nor hopeless
    assert result.top5[20] == 100.0  # 5 classes: top-5 is top-C


def _assert_no_near_ties(xtr, ytr, xte, ks, dtype):
    """Chunking changes the matmul shapes, so each cosine may round differently (float32: at most
    (dim + 4) units in the last place of a unit-vector dot product, worst case). The predictions are
    discrete and can only differ where the data has a near-tie: check that it has none, i.e. the k-th
    and (k+1)-th similarities and the two best class votes are further apart than that rounding."""
    u = torch.finfo(dtype).eps / 2
    bound = 2 * (xtr.shape[1] + 4) * u  # two similarities, each off by at most (dim + 4) u
    sims = torch.nn.functional.normalize(xte.double(), dim=1) @ torch.nn.functional.normalize(xtr.double(), dim=1).T
    for k in ks:
        v, i = sims.topk(k + 1, dim=1)
        assert float((v[:, k - 1] - v[:, k]).min()) > bound, k
        w = torch.exp((v[:, :k] - v[:, :1]) / T)
        votes = torch.zeros(len(xte), int(ytr.max()) + 1, dtype=w.dtype).scatter_add_(1, ytr[i[:, :k]], w)
        best = votes.topk(2, dim=1).values
        assert float(((best[:, 0] - best[:, 1]) / best[:, 0]).min()) > 100 * bound / T, k


def test_chunked_equals_unchunked(data):
    xtr, ytr, xte, yte = data
    xtr, xte = xtr.float(), xte.float()
    ks = (1, 5, 20)
    _assert_no_near_ties(xtr, ytr, xte, ks, torch.float32)
    whole = knn_classify(xtr, ytr, xte, test_labels=yte, num_classes=5, ks=ks, device="cpu")
    for test_chunk, train_chunk in [(7, 33), (200, 3), (1, 500)]:  # train_chunk 3 < k: merging matters
        chunked = knn_classify(xtr, ytr, xte, test_labels=yte, num_classes=5, ks=ks, device="cpu",
                               test_chunk=test_chunk, train_chunk=train_chunk)
        for k in ks:
            assert torch.equal(chunked.predictions[k], whole.predictions[k])
        assert chunked.top1 == whole.top1 and chunked.top5 == whole.top5


def test_k_larger_than_train_set_is_clipped(data):
    neighbors = pytest.importorskip("sklearn.neighbors")
    xtr, ytr, xte, _ = data
    xtr, ytr = xtr[:30], ytr[:30]
    result = knn_classify(xtr, ytr, xte, num_classes=5, ks=(30, 50), device="cpu", train_chunk=8)
    assert result.num_neighbours == {30: 30, 50: 30}
    assert torch.equal(result.predictions[50], result.predictions[30])
    sk = neighbors.KNeighborsClassifier(n_neighbors=30, metric="cosine", algorithm="brute",
                                        weights=lambda d: np.exp((1 - d) / T))
    expected = sk.fit(xtr.numpy(), ytr.numpy()).predict(xte.numpy())
    assert torch.equal(result.predictions[50], torch.from_numpy(expected))
    assert result.top1 == {} and result.top5 == {}  # no test labels, no accuracy


def test_accuracy_by_hand():
    # train: a = (1, 0) class 0, b = (0, 1) class 1, c = (1, 1) class 1 (cosine to (1,0) is 1/sqrt 2)
    xtr = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # norms do not matter
    ytr = torch.tensor([0, 1, 1])
    xte = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    yte = torch.tensor([0, 1])
    result = knn_classify(xtr, ytr, xte, test_labels=yte, num_classes=2, ks=(1, 3), temperature=1.0,
                          device="cpu")
    # query (1,0), k=3: class 0 gets e^1 = 2.72, class 1 gets e^0 + e^0.707 = 3.03 -> class 1 (wrong)
    assert math.exp(1) < 1 + math.exp(1 / math.sqrt(2))
    assert result.predictions[1].tolist() == [0, 1]
    assert result.predictions[3].tolist() == [1, 1]
    assert result.top1 == {1: 100.0, 3: 50.0}
    assert result.top5 == {1: 100.0, 3: 100.0}  # top-5 of 2 classes is top-2


def test_equal_votes_pick_lowest_class():
    xtr = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # both at cosine 0 from the query: equal weights
    xte = torch.tensor([[1.0, 0.0]])
    for ytr in (torch.tensor([2, 1]), torch.tensor([1, 2])):
        result = knn_classify(xtr, ytr, xte, num_classes=3, ks=(2,), device="cpu")
        assert result.predictions[2].tolist() == [1]


def test_small_temperature_does_not_underflow():
    xtr = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    ytr = torch.tensor([0, 1, 1])
    xte = torch.tensor([[0.0, 1.0]])  # similarities 0, 0.8, 0.8: exp(s / 1e-3) over/underflows float32
    result = knn_classify(xtr, ytr, xte, num_classes=2, ks=(3,), temperature=1e-3, device="cpu")
    assert result.predictions[3].tolist() == [1]


def test_bad_input_says_what_to_do(data):
    xtr, ytr, xte, _ = data
    with pytest.raises(DinolabError, match="num_classes"):
        knn_classify(xtr, ytr, xte, num_classes=3)
    with pytest.raises(DinolabError, match="same D"):
        knn_classify(xtr, ytr, xte[:, :4], num_classes=5)
    with pytest.raises(DinolabError, match="one label per row"):
        knn_classify(xtr, ytr[:10], xte, num_classes=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(data):
    xtr, ytr, xte, yte = data
    kwargs = {"test_labels": yte, "num_classes": 5, "ks": (1, 5, 20), "test_chunk": 64, "train_chunk": 128}
    cpu = knn_classify(xtr, ytr, xte, device="cpu", **kwargs)
    gpu = knn_classify(xtr, ytr, xte, device="cuda", **kwargs)
    for k in (1, 5, 20):
        assert torch.equal(gpu.predictions[k], cpu.predictions[k])
        assert gpu.predictions[k].device.type == "cpu"
