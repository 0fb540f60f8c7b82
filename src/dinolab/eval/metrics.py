"""Classification metrics shared by the frozen-feature evaluations (kNN, logreg, linear).

Conventions: scores are (M, C) with larger meaning "more likely"; labels and predictions are
int64 class indices in ``[0, C)``; accuracies are percentages in [0, 100].

Ties: ``topk_correct`` ranks classes with a stable sort, so among classes with equal scores the
lowest class index ranks first, the same rule as ``Tensor.argmax``. Top-1 from these functions
therefore always agrees with ``scores.argmax(1)``.

Example::

    acc = topk_accuracy(scores, labels)                # {1: 76.2, 5: 92.9}
    cm = confusion_matrix(scores.argmax(1), labels, num_classes=10)
    per_class_accuracy(cm).nanmean()                   # mean per-class accuracy
    plot_confusion_matrix(cm, class_names, "run/confusion.png")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dinolab.errors import DinolabError
from dinolab.io import atomic_save_figure

logger = logging.getLogger(__name__)

ANNOTATE_MAX_CLASSES = 20  # counts are written in the cells up to this many classes
TICK_LABELS_MAX_CLASSES = 50  # class names on the axes up to this many classes


def check_labels(labels: Tensor, num_classes: int, what: str = "labels") -> None:
    """Raise a DinolabError unless ``labels`` is a 1-D integer tensor with values in [0, num_classes)."""
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DinolabError(f"{what} must be a 1-D integer tensor of class indices, got {labels.dtype} "
                           f"of shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DinolabError(f"{what} must lie in [0, {num_classes}), got [{int(labels.min())}, "
                           f"{int(labels.max())}]: pass the right num_classes or remap the labels")


def topk_correct(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Per-sample top-k hits: ``{k: (M,) bool}``, True where the label is among the k best classes.

    ``k`` is clipped to the number of classes C (top-5 of a 3-class problem is top-3); the keys
    are the requested ``ks``. Equal scores rank the lower class index first.
    """
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise DinolabError(f"scores must be (M, C) with M = len(labels) = {labels.shape[0]}, "
                           f"got {tuple(scores.shape)}")
    if any(int(k) < 1 for k in ks):
        raise DinolabError(f"every k must be >= 1, got {tuple(ks)}")
    check_labels(labels, scores.shape[1])
    kmax = min(max(ks, default=1), scores.shape[1])
    # stable descending sort: ties keep index order, so the lowest class wins (as argmax)
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kmax]  # (M, kmax)
    hits = ranked == labels.to(ranked.device)[:, None]  # (M, kmax)
    return {int(k): hits[:, : min(int(k), kmax)].any(dim=1) for k in ks}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent, ``{k: acc}``; k is clipped to C (see :func:`topk_correct`).

    Args:
        scores: (M, C) class scores (logits, probabilities or votes: only the order matters).
        labels: (M,) int64 true classes in [0, C).
        ks: which k to report.
    """
    if labels.numel() == 0:
        raise DinolabError("topk_accuracy needs at least one sample; got an empty labels tensor")
    hits = topk_correct(scores, labels, ks)
    return {k: 100.0 * h.double().mean().item() for k, h in hits.items()}


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts ``cm[t, p]`` of samples with true class t predicted as p: (C, C) int64 on ``labels``' device.

    Rows are true classes, columns predicted classes; ``cm.sum() == len(labels)``.
    """
    check_labels(labels, num_classes, "labels")
    check_labels(preds, num_classes, "preds")
    if preds.shape != labels.shape:
        raise DinolabError(f"preds and labels must have the same length, got {preds.shape[0]} and "
                           f"{labels.shape[0]}")
    flat = labels.long() * num_classes + preds.long().to(labels.device)  # (M,) index into C*C cells
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: Tensor) -> Tensor:
    """Recall of each true class in percent: (C,) float64, ``diag / row sum``.

    Classes with no samples (an all-zero row) get NaN, not 0, so that they neither count as
    failures nor hide: use ``.nanmean()`` for the mean per-class accuracy.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DinolabError(f"a confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    cm = cm.double()
    support = cm.sum(dim=1)  # (C,) samples per true class
    correct = cm.diagonal()  # (C,)
    nan = torch.full_like(support, float("nan"))
    return torch.where(support > 0, 100.0 * correct / support.clamp(min=1), nan)


def plot_confusion_matrix(
    cm: Tensor,
    class_names: Sequence[str] | None,
    out_png: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Write a confusion-matrix heat map to ``out_png`` (atomically) and return its path.

    Colours are row-normalised (the fraction of each true class predicted as each class), so
    rare and frequent classes are equally readable; the cells carry the raw counts when there
    are at most 20 classes. Uses a matplotlib ``Figure`` with the Agg canvas and never touches
    pyplot's global state, so it is safe in servers and threads.

    Args:
        cm: (C, C) counts, rows = true class, columns = predicted (see :func:`confusion_matrix`).
        class_names: C names for the axes (shown up to 50 classes), or None for indices.
        out_png: output file; its folder is created if missing.
        title: figure title; defaults to the overall accuracy.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DinolabError(f"a confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise DinolabError(f"class_names has {len(class_names)} names but the matrix has {num_classes} "
                           "classes: pass one name per class, or None")
    counts = cm.detach().cpu().double().numpy()  # (C, C)
    if title is None:
        total = counts.sum()
        title = f"accuracy {100.0 * np.trace(counts) / max(total, 1):.2f}% ({int(total)} samples)"
    fig = _confusion_figure(counts, class_names, title)
    path = atomic_save_figure(fig, out_png)
    logger.info("wrote confusion matrix to %s", path)
    return path


def _confusion_figure(counts: np.ndarray, class_names: Sequence[str] | None, title: str):
    """A matplotlib Figure (Agg canvas) of the (C, C) ``counts``, coloured by row fraction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_classes = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)  # (C, 1)
    fractions = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)  # (C, C)
    side = float(np.clip(0.45 * num_classes + 2.5, 4.0, 20.0))  # inches
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if num_classes <= TICK_LABELS_MAX_CLASSES:
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, names, rotation=90 if num_classes > 8 else 0)
        ax.set_yticks(ticks, names)
    if num_classes <= ANNOTATE_MAX_CLASSES:
        for t, p in np.ndindex(num_classes, num_classes):
            if counts[t, p]:
                colour = "white" if fractions[t, p] > 0.5 else "black"
                ax.text(p, t, f"{int(counts[t, p])}", ha="center", va="center", fontsize=8, color=colour)
    return fig


