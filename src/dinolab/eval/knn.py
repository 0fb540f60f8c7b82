"""Weighted k-nearest-neighbour classification of frozen features, the DINOv2 kNN protocol.

Recipe (DINOv2 ``eval/knn.py``, after Wu et al. 2018, "Unsupervised feature learning via
non-parametric instance discrimination"):

1. L2-normalise train and test features; similarity is the cosine, ``s = x_test · x_train``.
2. Take the ``kmax = max(ks)`` most similar train samples of each test sample (clipped to N).
3. Each neighbour votes for its label with weight ``exp(s / T)``; for every k the votes of the
   k nearest neighbours are summed per class into scores (M, C) and the prediction is their argmax.

Weights are computed as ``exp((s - s_max) / T)`` with ``s_max`` the test sample's top similarity:
the same as ``exp(s / T)`` up to a per-sample factor (so the same argmax; DINOv2's softmax does
the same), but it cannot overflow or underflow to all zeros for small T.

Ties: when two classes have exactly equal summed weight, the lowest class index wins (argmax and
a stable sort for top-5). Exactly equal similarities (duplicate train features) at the k-th
neighbour are broken by ``torch.topk``, which gives no order guarantee.

Memory: the train bank is streamed in chunks of ``train_chunk`` rows and the test set in chunks
of ``test_chunk`` rows; the largest temporary is one (test_chunk, train_chunk) similarity block,
and a running top-kmax (M, kmax) per test sample is merged chunk by chunk. Each train chunk is
moved to ``device`` once, so a 1.3M x 1024 bank on the CPU works with a GPU ``device``.

Example::

    result = knn_classify(train.cls, train_labels, val.cls, test_labels=val_labels, num_classes=1000)
    result.top1[20]          # top-1 accuracy (%) with 20 neighbours
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dinolab.errors import DinolabError
from dinolab.eval.metrics import check_labels, topk_correct
from dinolab.eval.neighbours import topk_cosine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnResult:
    """Result of :func:`knn_classify`; every dict is keyed by the requested number of neighbours k.

    Attributes:
        top1: top-1 accuracy in percent per k; empty when no test labels were given.
        top5: top-5 accuracy in percent per k (top-C when C < 5); empty without test labels.
        predictions: (M,) int64 predicted class per k, on the CPU.
        num_neighbours: neighbours actually used per k (k clipped to the train set size).
    """

    top1: dict[int, float]
    top5: dict[int, float]
    predictions: dict[int, Tensor]
    num_neighbours: dict[int, int]


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int,
    test_labels: Tensor | None = None,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    test_chunk: int = 1024,
    train_chunk: int = 65536,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> KnnResult:
    """Classify ``test_features`` by a temperature-weighted vote of their nearest train features.

    Args:
        train_features: (N, D) float features of the labelled bank, any device.
        train_labels: (N,) int64 classes in [0, num_classes).
        test_features: (M, D) float features to classify.
        num_classes: C, the number of classes.
        test_labels: (M,) int64 true classes; when given, top-1/top-5 accuracies are reported.
        ks: numbers of neighbours to evaluate (DINOv2 default 10, 20, 100, 200).
        temperature: T in the vote weight ``exp(cos / T)``.
        test_chunk: test rows per similarity block.
        train_chunk: train rows per similarity block.
        device: where to compute; default CUDA when available, else the CPU. Computation is in
            float32, or float64 when the features are float64.
        progress: show a progress bar over train chunks.
    """
    _validate(train_features, train_labels, test_features, test_labels, num_classes, ks)
    if temperature <= 0 or test_chunk < 1 or train_chunk < 1:
        raise DinolabError(f"temperature, test_chunk and train_chunk must be positive, got "
                           f"{temperature}, {test_chunk}, {train_chunk}")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.promote_types(torch.promote_types(train_features.dtype, test_features.dtype), torch.float32)
    n = train_features.shape[0]
    num_neighbours = {int(k): min(int(k), n) for k in ks}
    if any(k > n for k in ks):
        logger.warning("kNN: only %d train samples, so k > %d is clipped to %d", n, n, n)

    sims, idx = topk_cosine(test_features.to(dtype), train_features.to(dtype), max(num_neighbours.values()),
                            query_chunk=test_chunk, db_chunk=train_chunk, device=device, progress=progress)
    sims, idx = sims.to(device), idx.to(device)  # (M, kmax) each, sorted
    neighbour_labels = train_labels.to(device)[idx]  # (M, kmax)
    predictions: dict[int, list[Tensor]] = {k: [] for k in num_neighbours}
    hits: dict[int, list[Tensor]] = {k: [] for k in num_neighbours}
    for start in range(0, sims.shape[0], test_chunk):
        rows = slice(start, start + test_chunk)
        scores = _vote_scores(sims[rows], neighbour_labels[rows], num_neighbours, num_classes, temperature)
        for k, s in scores.items():  # s: (m, C)
            predictions[k].append(s.argmax(dim=1).cpu())  # first maximum: lowest class index wins
            if test_labels is not None:
                correct = topk_correct(s, test_labels[rows].to(device), ks=(1, 5))
                hits[k].append(torch.stack([correct[1], correct[5]]).sum(dim=1).cpu())  # (2,)
    return _result(predictions, hits, num_neighbours, test_labels)


def _validate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor | None,
    num_classes: int,
    ks: Sequence[int],
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise DinolabError(f"features must be (N, D) and (M, D) with the same D, got "
                           f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise DinolabError("kNN needs at least one train and one test sample; got an empty feature tensor")
    if not (train_features.is_floating_point() and test_features.is_floating_point()):
        raise DinolabError("features must be floating point; convert them with .float()")
    if num_classes < 1 or not ks or any(int(k) < 1 for k in ks):
        raise DinolabError(f"num_classes and every k must be >= 1, got num_classes={num_classes}, ks={tuple(ks)}")
    check_labels(train_labels, num_classes, "train_labels")
    if train_labels.shape[0] != train_features.shape[0]:
        raise DinolabError(f"{train_labels.shape[0]} train_labels for {train_features.shape[0]} train features: "
                           "pass one label per row")
    if test_labels is not None:
        check_labels(test_labels, num_classes, "test_labels")
        if test_labels.shape[0] != test_features.shape[0]:
            raise DinolabError(f"{test_labels.shape[0]} test_labels for {test_features.shape[0]} test features: "
                               "pass one label per row")


def _vote_scores(
    sims: Tensor, labels: Tensor, num_neighbours: dict[int, int], num_classes: int, temperature: float
) -> dict[int, Tensor]:
    """Summed vote weights per class for each k: ``{k: (m, C)}`` from sorted (m, kmax) neighbours."""
    weights = torch.exp((sims - sims[:, :1]) / temperature)  # (m, kmax), exp(s/T) up to a row factor
    scores = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype, device=sims.device)  # (m, C)
    out: dict[int, Tensor] = {}
    done = 0
    # Add the neighbours in rank order, segment by segment, so each k reuses the smaller k's sum.
    for k, used in sorted(num_neighbours.items(), key=lambda item: item[1]):
        scores.scatter_add_(1, labels[:, done:used], weights[:, done:used])
        done = used
        out[k] = scores.clone()
    return out


def _result(
    predictions: dict[int, list[Tensor]],
    hits: dict[int, list[Tensor]],
    num_neighbours: dict[int, int],
    test_labels: Tensor | None,
) -> KnnResult:
    top1: dict[int, float] = {}
    top5: dict[int, float] = {}
    if test_labels is not None:
        for k, chunks in hits.items():
            correct = torch.stack(chunks).sum(dim=0).double()  # (2,) top-1 and top-5 hits
            top1[k], top5[k] = (100.0 * correct / test_labels.shape[0]).tolist()
            logger.info("kNN k=%d: top-1 %.2f%%, top-5 %.2f%%", k, top1[k], top5[k])
    return KnnResult(
        top1=top1,
        top5=top5,
        predictions={k: torch.cat(p) for k, p in predictions.items()},
        num_neighbours=num_neighbours,
    )
