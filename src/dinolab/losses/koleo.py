"""KoLeo regulariser: spread features out by pushing each one away from its nearest neighbour.

Sablayrolles, Douze, Schmid, Jégou 2019, "Spreading vectors for similarity search" (ICLR), which
derives it from the Kozachenko-Leonenko differential entropy estimator; used in DINOv2
(Oquab et al. 2023). Follows facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """``-1/B * sum_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised features ``x`` (B, D).

    ``nn(i)`` is the nearest *other* sample, found as the largest inner product (for unit vectors
    the same as the smallest distance) with the diagonal excluded. The distance is torch's
    ``pairwise_distance`` (it adds ``eps`` to the difference, as the official ``PairwiseDistance``
    does), so duplicates give a large but finite loss and finite gradients. Computed in float32
    with autocast off. The neighbour search is not differentiated; the distances are.

    Official use (``ssl_meta_arch.py``): on the student backbone's class tokens of the global
    crops, one call per global view (never across the two views of one image), summed::

        koleo = koleo_loss_weight * sum(KoLeoLoss()(cls) for cls in student_global_cls.chunk(2))

    (logged as ``koleo / 2``). Per process, over the local batch; no communication.

    Args:
        eps: added to norms and distances (official: 1e-8).

    Example:
        >>> KoLeoLoss()(torch.randn(16, 384))
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs features (B, D) with B >= 2 to have neighbours, got {tuple(features.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)  # (B, D)
            with torch.no_grad():
                dots = x @ x.t()  # (B, B) cosine similarities
                dots.fill_diagonal_(-torch.inf)  # a sample is not its own neighbour
                nearest = dots.argmax(dim=1)  # (B,)
            dist = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)  # (B,)
            return -torch.log(dist + self.eps).mean()
