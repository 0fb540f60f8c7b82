"""Depth losses of the DINOv2 depth evaluation: scale-invariant log loss and gradient matching.

- ``SigLoss``: Eigen, Puhrsch, Fergus 2014, "Depth Map Prediction from a Single Image using a
  Multi-Scale Deep Network" (NeurIPS), in the form of AdaBins (Bhat et al. 2021) that
  facebookresearch/dinov2 ``dinov2/eval/depth/models/losses/sigloss.py`` uses (lambda 0.15, eps 1e-3,
  weight 1.0 in the released depth configs, optional warm-up).
- ``GradientLoss``: the multi-scale gradient-matching term of MegaDepth (Li and Snavely 2018) as
  ``dinov2/eval/depth/models/losses/gradientloss.py`` intends it (see its note on the official code).

Example::

    loss = SigLoss(max_depth=10.0)(pred, gt) + GradientLoss(0.5, max_depth=10.0)(pred, gt)  # (B, 1, H, W)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SigLoss(nn.Module):
    """Scale-invariant log loss (Eigen et al. 2014) in the AdaBins / DINOv2 form.

    Over the valid pixels of the whole batch (gt > 0, and gt <= ``max_depth`` if given), with
    g = log(pred + eps) - log(gt + eps), eps = 1e-3::

        loss = weight * sqrt(Var(g) + lam * mean(g)^2)        (Var unbiased, lam = 0.15)
        warm-up: weight * sqrt(lam * mean(g)^2)                (official: the first 100 iterations)

    Shapes: pred and gt (B, 1, H, W) (any equal shapes). The warm-up is chosen by the caller
    (``warmup=True``), not counted inside the module.
    """

    def __init__(self, weight: float = 1.0, lam: float = 0.15, max_depth: float | None = None,
                 eps: float = 1e-3) -> None:
        super().__init__()
        self.weight, self.lam, self.max_depth, self.eps = weight, lam, max_depth, eps

    def forward(self, pred: Tensor, gt: Tensor, *, warmup: bool = False) -> Tensor:
        valid = gt > 0
        if self.max_depth is not None:
            valid &= gt <= self.max_depth
        if int(valid.sum()) < 2:  # nothing to fit (e.g. a crop of invalid pixels): no gradient
            return pred.sum() * 0.0
        g = torch.log(pred[valid] + self.eps) - torch.log(gt[valid] + self.eps)
        if warmup:
            return self.weight * torch.sqrt(self.lam * g.mean() ** 2)
        return self.weight * torch.sqrt(g.var() + self.lam * g.mean() ** 2)


class GradientLoss(nn.Module):
    """Multi-scale log-depth gradient matching (MegaDepth), as the official ``GradientLoss`` intends.

    At strides s in (1, 2, 4, 6) of the (H, W) maps: d = (log(pred + eps) - log(gt + eps)) * valid,
    and loss += (sum |d[y, x] - d[y, x+2]| + sum |d[y, x] - d[y+2, x]| over pixel pairs that are both
    valid) / (valid pixels at that stride). Shapes (B, 1, H, W).

    Note: the official code indexes a (B, 1, H, W) tensor as if it were (H, W), so its "gradients"
    run across the batch and channel axes; at its batch size of 2 per GPU that term is exactly 0.
    This class computes the intended spatial version.
    """

    def __init__(self, weight: float = 0.5, max_depth: float | None = None, eps: float = 1e-3) -> None:
        super().__init__()
        self.weight, self.max_depth, self.eps = weight, max_depth, eps

    def forward(self, pred: Tensor, gt: Tensor) -> Tensor:
        total = pred.sum() * 0.0
        for s in (1, 2, 4, 6):
            p, t = pred[..., ::s, ::s], gt[..., ::s, ::s]
            mask = t > 0
            if self.max_depth is not None:
                mask &= t <= self.max_depth
            n = mask.sum()
            if int(n) == 0:
                continue
            m = mask.to(p.dtype)
            d = (torch.log(p + self.eps) - torch.log(t + self.eps)) * m
            dv = (d[..., :-2, :] - d[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
            dh = (d[..., :, :-2] - d[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
            total = total + (dv.sum() + dh.sum()) / n
        return self.weight * total
