"""Multinomial logistic regression on frozen features, solved full-batch with L-BFGS in torch.

The objective is scikit-learn's ``LogisticRegression`` (lbfgs, multinomial, l2)::

    minimise over W (C_cls, D), b (C_cls,):   C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2

The bias is not penalised. We minimise the same objective divided by ``C * N`` (mean
cross-entropy + ||W||^2 / (2 C N)), which has the same minimiser and is better scaled for the
solver's tolerances. Because softmax ignores a shift of all biases, the bias is returned centred
(zero sum), as L-BFGS from zero would find it anyway.

DINOv2's logistic-regression evaluation fits cuML's solver on the raw features, choosing C on a
held-out part of the train set; :func:`logreg_grid` follows that recipe (raw features by
default, C chosen on a stratified split of train, never on test, then refit on all of train).

Memory: the features live on ``device`` once; the logits are computed ``chunk`` rows at a time
inside each full-batch objective evaluation, so (chunk, C_cls) is the largest temporary.

Example::

    result = logreg_grid(train.cls, train_labels, val.cls, val_labels, num_classes=1000)
    result.best_C, result.top1
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinolab.errors import DinolabError
from dinolab.eval.metrics import check_labels, topk_accuracy

logger = logging.getLogger(__name__)

# 12 values, 1e-6 .. 1e5: the span of DINOv2's logreg sweep at one value per decade.
DEFAULT_CS = tuple(10.0**p for p in range(-6, 6))


class LogisticRegressionModel(nn.Module):
    """A fitted linear classifier: ``scores(x) = x @ weight.T + bias``.

    Buffers: ``weight`` (C_cls, D) and ``bias`` (C_cls,), in the space of the raw input features
    (a standardisation used during fitting is folded in). ``n_iter`` is the L-BFGS iterations used.
    """

    def __init__(self, weight: Tensor, bias: Tensor, n_iter: int = 0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", bias.detach())
        self.n_iter = n_iter

    def forward(self, x: Tensor) -> Tensor:
        """Logits (M, C_cls) of features x (M, D), on the model's device."""
        x = x.to(self.weight.device, self.weight.dtype)
        return x @ self.weight.T + self.bias

    def scores(self, x: Tensor) -> Tensor:
        """Logits (M, C_cls); same as calling the model."""
        return self(x)

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (M, C_cls)."""
        return self(x).softmax(dim=1)

    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes (M,) int64; equal logits pick the lowest class index."""
        return self(x).argmax(dim=1)


@dataclass(frozen=True)
class LogRegResult:
    """Result of :func:`logreg_grid`.

    Attributes:
        best_C: the C with the best held-out accuracy (the smallest such C on ties).
        val_top1: held-out top-1 accuracy (%) for every C tried.
        model: the classifier refitted on all of train with ``best_C``.
        predictions: (M,) int64 predicted test classes, on the CPU.
        top1: test top-1 accuracy (%), None when no test labels were given.
        top5: test top-5 accuracy (%) (top-C_cls when fewer classes), None without test labels.
    """

    best_C: float
    val_top1: dict[float, float]
    model: LogisticRegressionModel
    predictions: Tensor
    top1: float | None
    top5: float | None


def fit_logreg(
    x: Tensor,
    y: Tensor,
    *,
    C: float,
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-4,
    standardize: bool = False,
    chunk: int = 65536,
    device: str | torch.device | None = None,
    init: LogisticRegressionModel | None = None,
) -> LogisticRegressionModel:
    """Fit ``C * sum_i CE_i + 0.5 * ||W||^2`` (bias unpenalised; scikit-learn's objective) with L-BFGS.

    Args:
        x: (N, D) float features; float64 input is solved in float64, anything else in float32.
        y: (N,) int64 classes in [0, num_classes).
        C: inverse regularisation strength, as in scikit-learn (larger = weaker penalty).
        num_classes: C_cls, the number of classes (classes absent from y get low scores).
        max_iter: L-BFGS iterations; a warning is logged when they run out.
        tol: stop when the largest gradient entry of the scaled objective is below this, or
            when the loss stops changing; scikit-learn's lbfgs uses the same rule and default.
        standardize: fit on per-feature standardised x (mean 0, population std 1, like
            scikit-learn's StandardScaler); the penalty then applies in that space, but the
            returned model still takes raw features.
        chunk: rows per logits block (memory only).
        device: where to solve; default CUDA when available, else the CPU.
        init: warm start from this model (same shapes), e.g. the solution for a nearby C.
    """
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise DinolabError(f"x must be (N, D) with N >= 1 and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if C <= 0 or max_iter < 1 or chunk < 1:
        raise DinolabError(f"C, max_iter and chunk must be positive, got {C}, {max_iter}, {chunk}")
    check_labels(y, num_classes, "y")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(device, dtype), y.to(device)
    mean = x.mean(dim=0) if standardize else torch.zeros(x.shape[1], dtype=dtype, device=device)  # (D,)
    std = x.std(dim=0, correction=0).clamp(min=1e-12) if standardize else torch.ones_like(mean)  # (D,)
    if standardize:
        x = (x - mean) / std  # (N, D)
    weight = torch.zeros(num_classes, x.shape[1], dtype=dtype, device=device)  # (C_cls, D)
    bias = torch.zeros(num_classes, dtype=dtype, device=device)  # (C_cls,)
    if init is not None:  # init is in raw space: move it into the standardised one
        if init.weight.shape != weight.shape:
            raise DinolabError(f"init has weight {tuple(init.weight.shape)}, expected {tuple(weight.shape)}")
        weight = init.weight.to(device, dtype) * std
        bias = init.bias.to(device, dtype) + init.weight.to(device, dtype) @ mean
    weight, bias, n_iter = _lbfgs(x, y, weight, bias, C=C, max_iter=max_iter, tol=tol, chunk=chunk)
    weight = weight / std  # fold the standardisation back: W x_std + b = (W / std) x + (b - W mean / std)
    bias = bias - weight @ mean
    return LogisticRegressionModel(weight, bias - bias.mean(), n_iter)


def _lbfgs(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, *, C: float, max_iter: int, tol: float, chunk: int
) -> tuple[Tensor, Tensor, int]:
    """Minimise mean CE + ||W||^2 / (2 C N) from (weight, bias); returns the solution and iterations."""
    n = x.shape[0]
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    eps = torch.finfo(x.dtype).eps
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=tol, tolerance_change=64 * eps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        penalty = weight.square().sum() / (2.0 * C * n)
        penalty.backward()
        total = penalty.detach()
        for start in range(0, n, chunk):  # gradients accumulate over the chunks: still full batch
            logits = x[start:start + chunk] @ weight.T + bias  # (chunk, C_cls)
            loss = F.cross_entropy(logits, y[start:start + chunk], reduction="sum") / n
            loss.backward()
            total = total + loss.detach()
        return total

    opt.step(closure)
    n_iter = int(opt.state[weight].get("n_iter", 0))
    if n_iter >= max_iter:
        logger.warning("logreg C=%g: L-BFGS used all max_iter=%d iterations without reaching tol=%g; "
                       "raise max_iter or tol, or standardize the features", C, max_iter, tol)
    return weight.detach(), bias.detach(), n_iter


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, val), sorted: ``val_fraction`` of every class (rounded) goes to val.

    Every class with at least two samples keeps one in each part; a class with a single sample
    stays in train. The split depends only on ``labels`` and ``seed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DinolabError(f"val_fraction must be in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, val = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)  # (n_c,)
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = min(max(round(val_fraction * members.numel()), 1), members.numel() - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def logreg_grid(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor | None = None,
    *,
    num_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    standardize: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> LogRegResult:
    """Choose C on a held-out split of train, refit on all of train, classify ``test_x``.

    C is picked by top-1 accuracy on a stratified ``val_fraction`` of train (``seed`` fixes the
    split); ``test_y`` is only used to report accuracy, never to choose. Cs are tried in increasing
    order, each fit warm-started from the previous one. Default Cs: ``DEFAULT_CS`` = 1e-6 .. 1e5,
    one per decade (scikit-learn's C convention, see :func:`fit_logreg`).

    Args:
        train_x, train_y: (N, D) float features and (N,) int64 labels to fit on.
        test_x: (M, D) features to classify; test_y: optional (M,) labels for top-1/top-5.
        num_classes: the number of classes.
        max_iter, standardize: passed to :func:`fit_logreg`.
        device: where to solve; default CUDA when available, else the CPU.
        progress: show a progress bar over the Cs.
    """
    if not Cs:
        raise DinolabError("Cs is empty: pass at least one C, e.g. Cs=(0.1, 1.0, 10.0)")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    train_x, train_y = train_x.to(device, dtype), train_y.to(device)  # moved once, shared by all fits
    fit_idx, val_idx = (i.to(device) for i in stratified_split(train_y, val_fraction, seed))
    if val_idx.numel() == 0:
        raise DinolabError("the held-out split is empty: every class has one sample; add data or pass Cs=(C,)")
    options = {"num_classes": num_classes, "max_iter": max_iter, "standardize": standardize, "device": device}
    val_top1: dict[float, float] = {}
    model = None
    for C in tqdm(sorted(float(c) for c in Cs), disable=not progress, desc="logreg C", unit="C"):
        model = fit_logreg(train_x[fit_idx], train_y[fit_idx], C=C, init=model, **options)
        val_top1[C] = topk_accuracy(model(train_x[val_idx]), train_y[val_idx], ks=(1,))[1]
        logger.info("logreg C=%g: held-out top-1 %.2f%% (%d iterations)", C, val_top1[C], model.n_iter)
    best_C = max(val_top1, key=lambda c: (val_top1[c], -c))  # best accuracy, then the smallest C
    model = fit_logreg(train_x, train_y, C=best_C, **options)
    scores = model(test_x)  # (M, C_cls)
    top1 = top5 = None
    if test_y is not None:
        top1, top5 = topk_accuracy(scores, test_y.to(scores.device), ks=(1, 5)).values()
        logger.info("logreg C=%g: test top-1 %.2f%%, top-5 %.2f%%", best_C, top1, top5)
    return LogRegResult(best_C=best_C, val_top1=val_top1, model=model,
                        predictions=scores.argmax(dim=1).cpu(), top1=top1, top5=top5)
