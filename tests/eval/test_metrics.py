"""Classification metrics: hand-computed values, scikit-learn parity, the confusion-matrix plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.errors import DinolabError
from dinolab.eval.metrics import (
    confusion_matrix,
    per_class_accuracy,
    plot_confusion_matrix,
    topk_accuracy,
    topk_correct,
)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([
        [0.1, 0.5, 0.2, 0.0],  # order 1, 2, 0, 3
        [0.9, 0.0, 0.05, 0.05],  # order 0, 2, 3, 1 (2 and 3 tie: the lower index first)
        [0.2, 0.3, 0.4, 0.1],  # order 2, 1, 0, 3
    ])
    labels = torch.tensor([1, 3, 0])
    # sample 0: rank 1; sample 1: rank 3; sample 2: rank 3
    acc = topk_accuracy(scores, labels, ks=(1, 2, 3, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(100 / 3)
    assert acc[3] == pytest.approx(100.0)
    assert acc[5] == pytest.approx(100.0)  # k clipped to C = 4


def test_topk_ties_follow_argmax():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 0.0]])
    hits = topk_correct(scores, torch.tensor([1, 0]), ks=(1,))
    assert hits[1].tolist() == [True, True]  # lowest tied class index ranks first, like argmax
    assert topk_correct(scores, torch.tensor([2, 1]), ks=(1, 2))[2].tolist() == [True, True]


def test_topk_bad_input_says_what_to_do():
    with pytest.raises(DinolabError, match="num_classes"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(DinolabError, match="empty"):
        topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_confusion_matrix_matches_sklearn():
    sk_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (300,), generator=g)
    preds = torch.where(torch.rand(300, generator=g) < 0.6, labels, torch.randint(0, 6, (300,), generator=g))
    cm = confusion_matrix(preds, labels, num_classes=6)
    expected = sk_metrics.confusion_matrix(labels.numpy(), preds.numpy(), labels=list(range(6)))
    assert cm.dtype == torch.int64 and torch.equal(cm, torch.from_numpy(expected))
    recall = sk_metrics.recall_score(labels.numpy(), preds.numpy(), average=None)
    np.testing.assert_allclose(per_class_accuracy(cm).numpy(), 100 * recall)


def test_per_class_accuracy_empty_class_is_nan():
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])
    acc = per_class_accuracy(cm)
    assert acc[0].item() == pytest.approx(75.0) and acc[2].item() == pytest.approx(50.0)
    assert math.isnan(acc[1].item())
    assert acc.nanmean().item() == pytest.approx(62.5)


@pytest.mark.parametrize("num_classes", [3, 25])
def test_plot_confusion_matrix_writes_png_atomically(tmp_path, num_classes):
    plt = pytest.importorskip("matplotlib.pyplot")
    figures_before = plt.get_fignums()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (200,), generator=g)
    cm = confusion_matrix(torch.randint(0, num_classes, (200,), generator=g), labels, num_classes)
    names = [f"class {i}" for i in range(num_classes)]
    out = plot_confusion_matrix(cm, names, tmp_path / "sub" / "cm.png", title="test")
    assert out == tmp_path / "sub" / "cm.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) > 100
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # no temp file left behind
    assert plt.get_fignums() == figures_before  # pyplot's global state untouched


def test_plot_confusion_matrix_checks_names(tmp_path):
    with pytest.raises(DinolabError, match="one name per class"):
        plot_confusion_matrix(torch.eye(3, dtype=torch.long), ["a", "b"], tmp_path / "cm.png")
    assert not any(tmp_path.iterdir())
