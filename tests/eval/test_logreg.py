"""L-BFGS logistic regression: same objective and accuracy as scikit-learn; C chosen without test labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolab.errors import DinolabError
from dinolab.eval.logreg import fit_logreg, logreg_grid, stratified_split

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    """600 samples, 20 features, 4 overlapping classes; 400 train / 200 test, float64."""
    x, y = make_classification(n_samples=600, n_features=20, n_informative=8, n_redundant=4, n_classes=4,
                               n_clusters_per_class=1, class_sep=0.8, flip_y=0.05, random_state=0)
    xtr, xte, ytr, yte = train_test_split(x, y, train_size=400, stratify=y, random_state=0)
    return tuple(torch.from_numpy(a) for a in (xtr, ytr, xte, yte))


def _accuracy(pred, y) -> float:
    return 100.0 * (np.asarray(pred) == np.asarray(y)).mean()


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_same_objective_as_sklearn(problem, C):
    xtr, ytr, xte, yte = problem
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(xtr.numpy(), ytr.numpy())
    model = fit_logreg(xtr, ytr, C=C, num_classes=4, tol=1e-10, device="cpu")  # float64 solve
    assert abs(_accuracy(model.predict(xte), yte) - _accuracy(sk.predict(xte.numpy()), yte)) <= 0.5
    w_sk, b_sk = torch.from_numpy(sk.coef_), torch.from_numpy(sk.intercept_ - sk.intercept_.mean())
    assert (model.weight - w_sk).norm() / w_sk.norm() < 1e-2
    assert (model.bias - b_sk).norm() / b_sk.norm() < 1e-2
    np.testing.assert_allclose(model.predict_proba(xte).numpy(), sk.predict_proba(xte.numpy()), atol=1e-3)


def test_float32_solve_matches_sklearn_accuracy(problem):
    xtr, ytr, xte, yte = problem
    sk = LogisticRegression(C=0.1, max_iter=5000).fit(xtr.numpy(), ytr.numpy())
    model = fit_logreg(xtr.float(), ytr, C=0.1, num_classes=4, device="cpu", chunk=128)
    assert model.weight.dtype == torch.float32
    assert abs(_accuracy(model.predict(xte.float()), yte) - _accuracy(sk.predict(xte.numpy()), yte)) <= 0.5
    w_sk = torch.from_numpy(sk.coef_).float()
    assert (model.weight - w_sk).norm() / w_sk.norm() < 1e-2


def test_standardize_matches_sklearn_pipeline(problem):
    xtr, ytr, xte, _ = problem
    scale = torch.linspace(0.1, 10, 20, dtype=torch.float64)  # uneven feature scales and offsets
    xtr, xte = xtr * scale + 3, xte * scale + 3
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000, tol=1e-10))
    sk.fit(xtr.numpy(), ytr.numpy())
    model = fit_logreg(xtr, ytr, C=0.5, num_classes=4, standardize=True, tol=1e-10, device="cpu")
    np.testing.assert_allclose(model.predict_proba(xte).numpy(), sk.predict_proba(xte.numpy()), atol=1e-3)


def test_grid_chooses_C_without_test_labels(problem):
    xtr, ytr, xte, yte = problem
    Cs = (1e-5, 1e-3, 1e-1, 1e1, 1e3)
    blind = logreg_grid(xtr, ytr, xte, num_classes=4, Cs=Cs, device="cpu")
    assert blind.top1 is None and blind.top5 is None
    assert set(blind.val_top1) == set(Cs) and blind.val_top1[blind.best_C] == max(blind.val_top1.values())
    assert blind.best_C >= 1e-3  # 1e-5 shrinks everything to the class prior
    # giving test labels (right or scrambled) changes nothing but the reported accuracy
    results = [logreg_grid(xtr, ytr, xte, labels, num_classes=4, Cs=Cs, device="cpu") for labels in (yte, yte.flip(0))]
    for seen in results:
        assert seen.best_C == blind.best_C and torch.equal(seen.predictions, blind.predictions)
    result = results[0]
    assert result.top1 == pytest.approx(_accuracy(result.predictions, yte))
    sk = LogisticRegression(C=result.best_C, max_iter=5000).fit(xtr.numpy(), ytr.numpy())
    assert abs(result.top1 - _accuracy(sk.predict(xte.numpy()), yte)) <= 0.5
    assert result.top1 > 60 and result.top5 == 100.0  # 4 classes: top-5 is top-4


def test_stratified_split():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [10, 6, 0, 1]
    assert torch.equal(stratified_split(labels, 0.2, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 0.2, seed=1)[1], val)


def test_bad_input_says_what_to_do(problem):
    xtr, ytr, xte, _ = problem
    with pytest.raises(DinolabError, match="num_classes"):
        fit_logreg(xtr, ytr, C=1.0, num_classes=3)
    with pytest.raises(DinolabError, match="positive"):
        fit_logreg(xtr, ytr, C=0.0, num_classes=4)
    with pytest.raises(DinolabError, match="val_fraction"):
        logreg_grid(xtr, ytr, xte, num_classes=4, val_fraction=1.0)
