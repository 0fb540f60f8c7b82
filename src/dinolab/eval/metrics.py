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


# ------------------------------------------------------------------------------ semantic segmentation


def segmentation_confusion(preds: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Pixel counts ``cm[t, p]`` of true class t predicted as p over the labelled pixels: (C, C) int64.

    ``preds`` and ``labels`` are integer tensors of one shape (any, e.g. (H, W) or (B, H, W)).
    Pixels whose label is ``ignore_index`` are left out; any other label outside [0, C) and any
    prediction outside [0, C) raises ``SegmentationError`` (a wrong ``num_classes`` or an unmapped
    label would otherwise be counted silently).
    """
    from dinolab.data.segmentation import SegmentationError

    if preds.shape != labels.shape:
        raise SegmentationError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape: "
                                "resize the predictions to the label size first")
    if preds.dtype.is_floating_point or labels.dtype.is_floating_point:
        raise SegmentationError("preds and labels must be integer class maps (use logits.argmax(1) for preds)")
    labels = labels.reshape(-1).long()
    preds = preds.reshape(-1).long().to(labels.device)
    keep = labels != ignore_index
    labels, preds = labels[keep], preds[keep]
    for name, t in (("labels", labels), ("preds", preds)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            bad = torch.unique(t[(t < 0) | (t >= num_classes)])[:5].tolist()
            raise SegmentationError(f"{name} hold values {bad} outside [0, {num_classes}) that are not the ignore "
                                    f"index {ignore_index}: pass the right num_classes / ignore_index")
    flat = labels * num_classes + preds  # (M,) index into the C*C cells
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(cm: Tensor) -> dict[str, float | list[float]]:
    """mmseg-style scores from a pixel confusion matrix ``cm[t, p]`` (see ``segmentation_confusion``).

    Returns percentages: ``miou`` (mean of the per-class IoU over classes that occur in the labels or
    the predictions), ``iou`` (per class, ``tp / (tp + fp + fn)``; NaN for a class absent from both),
    ``pixel_acc`` (correct / labelled pixels, mmseg's aAcc), ``acc`` (per-class recall; NaN for a
    class absent from the labels) and ``macc`` (their mean over present classes).
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise DinolabError(f"a confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    cm = cm.double()
    tp = cm.diagonal()  # (C,)
    support = cm.sum(dim=1)  # (C,) labelled pixels of each class
    union = support + cm.sum(dim=0) - tp  # (C,) tp + fn + fp
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, 100.0 * tp / union.clamp(min=1), nan)
    acc = torch.where(support > 0, 100.0 * tp / support.clamp(min=1), nan)
    total = float(cm.sum())
    return {
        "miou": float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else float("nan"),
        "macc": float(acc.nanmean()) if bool((support > 0).any()) else float("nan"),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
    }


# -------------------------------------------------------------------------------- monocular depth

DEPTH_METRICS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")


def depth_crop_mask(height: int, width: int, crop: str | None) -> np.ndarray:
    """(H, W) bool mask of the evaluation crop.

    ``"eigen"`` (NYU): rows 45:471, columns 41:601 at 480x640, scaled proportionally (integer floor)
    at other sizes. ``"garg"`` (KITTI): rows ``int(0.40810811 H):int(0.99189189 H)``, columns
    ``int(0.03594771 W):int(0.96405229 W)``. ``None``: every pixel.
    """
    mask = np.zeros((height, width), bool)
    if crop is None:
        mask[:] = True
    elif crop == "eigen":
        mask[45 * height // 480: 471 * height // 480, 41 * width // 640: 601 * width // 640] = True
    elif crop == "garg":
        mask[int(0.40810811 * height): int(0.99189189 * height), int(0.03594771 * width): int(0.96405229 * width)] = True
    else:
        raise ValueError(f"crop must be 'eigen', 'garg' or None, got {crop!r}")
    return mask


def depth_metrics(pred: np.ndarray | Tensor, gt: np.ndarray | Tensor, *, min_depth: float = 1e-3,
                  max_depth: float = 10.0, crop: str | None = None) -> dict[str, float]:
    """Standard monocular-depth errors of one image (BTS / Monocular-Depth-Estimation-Toolbox).

    Pixels count where ``gt`` is finite, > 0, within ``[min_depth, max_depth]`` and inside ``crop``;
    ``pred`` is clipped to ``[min_depth, max_depth]`` first. With d = log(pred) - log(gt):
    ``rmse`` sqrt(mean((p - g)^2)) in metres, ``abs_rel`` mean(|p - g| / g), ``sq_rel``
    mean((p - g)^2 / g), ``rmse_log`` sqrt(mean(d^2)), ``log10`` mean(|log10 p - log10 g|),
    ``silog`` 100 sqrt(mean(d^2) - mean(d)^2), ``delta{k}`` the fraction with max(p/g, g/p) < 1.25^k.
    Average these per image over a data set (:func:`mean_depth_metrics`), as the toolboxes do.
    """
    from dinolab.data.depth import DepthDataError, valid_depth_mask

    p = (pred.detach().cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)).astype(np.float64)
    g = (gt.detach().cpu().numpy() if isinstance(gt, Tensor) else np.asarray(gt)).astype(np.float64)
    while p.ndim > 2 and p.shape[0] == 1:  # (1, 1, H, W) -> (H, W)
        p = p[0]
    while g.ndim > 2 and g.shape[0] == 1:
        g = g[0]
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must be one (H, W) map each: resize the prediction "
                         "to the ground-truth size first")
    mask = valid_depth_mask(g, min_depth, max_depth) & depth_crop_mask(*g.shape, crop)
    if not mask.any():
        raise DepthDataError(f"no valid ground-truth pixel in [{min_depth:g}, {max_depth:g}] m inside crop {crop}")
    if not np.isfinite(p[mask]).all():
        raise ValueError("the prediction has non-finite values on valid pixels")
    p, g = np.clip(p[mask], min_depth, max_depth), g[mask]
    d = np.log(p) - np.log(g)
    ratio = np.maximum(p / g, g / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "sq_rel": float(np.mean((p - g) ** 2 / g)),
        "rmse_log": float(np.sqrt(np.mean(d**2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        "silog": float(100.0 * np.sqrt(max(np.mean(d**2) - np.mean(d) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def mean_depth_metrics(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over images (every image weighs the same, whatever its valid pixels)."""
    if not per_image:
        raise ValueError("mean_depth_metrics needs at least one image's metrics")
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
