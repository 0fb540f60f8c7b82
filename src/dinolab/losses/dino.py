"""DINO loss: cross-entropy from teacher target distributions to student predictions, per view pair.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO), and
Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision". Follows
facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py`` (``DINOLoss.forward``) and the
weighting in ``dinov2/train/ssl_meta_arch.py`` (``forward_backward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Sum over view pairs of the batch-mean cross-entropy ``H(teacher_probs[t], student[s])``.

    For student logits ``s`` (S, B, K) and teacher target probabilities ``p`` (T, B, K)::

        term(s, t) = -1/B * sum_b sum_k p[t, b, k] * log_softmax(s[s, b] / student_temp)[k]
        loss       = sum over pairs (s, t) of term(s, t)

    with all S * T pairs, or, when ``skip_same_view=True`` (S == T, view i of the student and of
    the teacher are the same crop), the S * (S - 1) pairs with ``s != t``. The two DINOv2 uses:

    - local crops: ``loss(local_logits (L, B, K), teacher_probs (2, B, K), skip_same_view=False)``,
      every local student view against both global teacher views (2L terms);
    - global crops: ``loss(global_logits (2, B, K), teacher_probs (2, B, K), skip_same_view=True)``,
      student view 0 against teacher view 1 and vice versa (2 terms; the official code gets the
      same pairs by swapping the teacher's two views).

    The result is a *sum* of terms, not a mean. Official weighting (``ssl_meta_arch.py``), with
    G = 2 global and L local crops::

        n_terms   = G * (G - 1) + max(G * L, 1)            # dino_loss_term_count(G, L)
        dino_loss = dino_loss_weight * (local_sum + global_sum) / n_terms

    i.e. the mean over all pair terms. Quirk kept by ``dino_loss_term_count``: with no local crops
    the official denominator is 2 + 1 = 3, not 2. The per-rank loss averages over the local batch
    only; data-parallel gradient averaging does the rest (no communication here).

    The student log-softmax is computed in float32 (teacher targets are float32); gradients flow
    into ``student_logits`` only: ``teacher_probs`` is detached.

    Args:
        student_temp: temperature of the student softmax (official: 0.1).

    Example:
        >>> loss_fn = DINOLoss()
        >>> teacher = torch.softmax(torch.randn(2, 8, 16) / 0.04, dim=-1)   # (T=2, B=8, K=16)
        >>> local = loss_fn(torch.randn(6, 8, 16), teacher, skip_same_view=False)   # 12 terms
        >>> glob = loss_fn(torch.randn(2, 8, 16), teacher, skip_same_view=True)     # 2 terms
        >>> total = (local + glob) / dino_loss_term_count(n_global_crops=2, n_local_crops=6)
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, *, skip_same_view: bool) -> Tensor:
        """Scalar sum over view pairs of batch-mean cross-entropies; see the class docstring."""
        _check_shapes(student_logits, teacher_probs, skip_same_view)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (S, B, K)
        # s = student views, t = teacher views, b = batch, k = prototypes
        ce = -torch.einsum("tbk,sbk->st", teacher_probs.detach().float(), log_p) / log_p.shape[1]  # (S, T)
        if skip_same_view:
            return ce.sum() - ce.diagonal().sum()
        return ce.sum()


def dino_loss_term_count(n_global_crops: int, n_local_crops: int) -> int:
    """Official denominator of the DINO loss: ``G * (G - 1) + max(G * L, 1)`` pair terms.

    Divide ``DINOLoss`` sums (local + global) by this to reproduce DINOv2's weighting; the
    ``max(., 1)`` is the official code's guard for ``L = 0`` (which makes the count 3 for G = 2).
    """
    return n_global_crops * (n_global_crops - 1) + max(n_global_crops * n_local_crops, 1)


def _check_shapes(student_logits: Tensor, teacher_probs: Tensor, skip_same_view: bool) -> None:
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student logits (S, B, K) and teacher probs (T, B, K), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}; split stacked views "
            "with x.unflatten(0, (n_views, -1))"
        )
    if student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"student (S, B, K) = {tuple(student_logits.shape)} and teacher (T, B, K) = "
            f"{tuple(teacher_probs.shape)} must agree on batch size and prototypes"
        )
    if skip_same_view and student_logits.shape[0] != teacher_probs.shape[0]:
        raise ValueError(
            f"skip_same_view pairs student view i with teacher views j != i, so both need the same "
            f"number of views; got S={student_logits.shape[0]}, T={teacher_probs.shape[0]}"
        )
