"""Teacher targets: turn teacher logits into the probabilities the student is trained towards.

DINOv2 prevents collapse of the teacher with one of two target rules, picked once at construction
(the training step only calls ``targets`` and ``update``):

- ``SoftmaxCentering``: ``softmax((logits - c) / temp)`` where ``c`` is an EMA of the teacher's
  batch-mean logits (DINO, Caron et al. 2021). Centering discourages one prototype dominating;
  the low teacher temperature sharpens.
- ``SinkhornKnopp``: a few Sinkhorn-Knopp iterations that make the batch use every prototype
  equally (SwAV, Caron et al. 2020); DINOv2's default for both DINO and iBOT targets.

Both need statistics of the *global* batch. They take ``reduce``: a function that sums a tensor
over all processes (an all-reduce SUM) and returns the result; the default is the identity, which
is exact for one process. Each call passes a fresh tensor that is not used afterwards, so an
in-place all-reduce that returns its argument is fine. Ranks may hold different numbers of rows:
the global count is always obtained through ``reduce``, never assumed to be ``N * world_size``.

Targets are computed without gradient and in at least float32 (float64 input stays float64).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduce = Callable[[Tensor], Tensor]
"""Sum a tensor over all processes and return the sum (all-reduce SUM); identity for one process."""


def identity_reduce(t: Tensor) -> Tensor:
    """The single-process ``Reduce``: nothing to add."""
    return t


def _float(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is (half precision overflows in ``exp``)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class TeacherCentering(nn.Module, ABC):
    """A rule mapping teacher logits ``(N, K)`` to target probabilities ``(N, K)``.

    Use per training step: ``probs = c.targets(logits, temp)`` and then ``c.update(logits)``.
    A module, so that state (the softmax center) moves with ``.to()`` and lives in ``state_dict``.
    """

    @abstractmethod
    def targets(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """Target probabilities ``(N, K)`` for teacher logits ``(N, K)`` at temperature ``temp``."""

    @abstractmethod
    def update(self, teacher_logits: Tensor) -> None:
        """Fold this step's teacher logits ``(N, K)`` into the rule's state, if it has any."""


class SoftmaxCentering(TeacherCentering):
    """``softmax((logits - center) / temp)`` with ``center`` an EMA of global batch-mean logits.

    ``update`` sets ``center <- momentum * center + (1 - momentum) * mean_n logits[n]``, the mean
    taken over the rows of all processes (sum and count are all-reduced together in one call).

    Timing: the official code starts the all-reduce of the batch mean asynchronously after
    computing the targets and applies it at the start of the next ``targets`` call. Calling
    ``targets`` and then ``update`` in each step, as here, uses exactly the same center values
    (step t is centered with batches up to t - 1), only without overlapping the communication.

    Difference from the official iBOT patch center: with several processes the official code
    averages the per-process means of the masked patches; here the mean is over all masked
    patches of all processes. The two agree when every process masks the same number of patches.

    Args:
        out_dim: number of prototypes K.
        momentum: EMA momentum of the center (official: 0.9).
        reduce: all-reduce SUM over processes; identity (one process) when None.

    Example:
        >>> c = SoftmaxCentering(out_dim=4)
        >>> logits = torch.randn(8, 4)
        >>> probs = c.targets(logits, temp=0.04)  # (8, 4), rows sum to 1
        >>> c.update(logits)
    """

    center: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9, reduce: Reduce | None = None) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.reduce = reduce or identity_reduce
        # (1, K) float32 like the official ``dino_loss.center`` buffer.
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher_logits: Tensor, temp: float) -> Tensor:
        _check_logits(teacher_logits, self.center.shape[1])
        return F.softmax((_float(teacher_logits) - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        _check_logits(teacher_logits, self.center.shape[1])
        logits = _float(teacher_logits)
        count = logits.new_tensor([logits.shape[0]])
        totals = self.reduce(torch.cat([logits.sum(dim=0), count]))  # (K + 1,) global sums
        n_global = totals[-1]
        batch_center = (totals[:-1] / n_global.clamp(min=1)).to(self.center.dtype)
        # No rows on any process (possible for masked patches): keep the center (no host sync).
        momentum = torch.where(n_global > 0, self.momentum, 1.0).to(self.center.dtype)
        self.center.mul_(momentum).add_((1 - momentum) * batch_center)


class SinkhornKnopp(TeacherCentering):
    """Targets from ``n_iters`` Sinkhorn-Knopp iterations over the global batch (SwAV).

    With ``Q = exp(logits / temp)^T`` of shape (K, B) over the B rows of *all* processes:

    1. ``Q /= Q.sum()``
    2. ``n_iters`` times: each prototype row to total ``1 / K`` (row sums all-reduced), then
       each sample column to total ``1 / B`` (a column lives on one process: no communication).
    3. ``Q *= B``: each sample's distribution over prototypes sums to 1.

    The result is returned transposed, ``(N, K)`` like the input. ``B`` is the all-reduced row
    count, so ranks may hold different numbers of rows (iBOT: masked patches per process).

    Before ``exp`` a scalar shared by all processes is subtracted (the mean of the per-process
    maxima); a common scalar cancels in step 1, so the result is mathematically the official one,
    but large ``logits / temp`` no longer overflow. ``update`` is a no-op: the rule has no state.

    Args:
        n_iters: Sinkhorn-Knopp iterations (official: 3).
        reduce: all-reduce SUM over processes; identity (one process) when None.

    Example:
        >>> sk = SinkhornKnopp()
        >>> probs = sk.targets(torch.randn(8, 4), temp=0.07)  # (8, 4), rows sum to 1
        >>> probs.sum(dim=0)  # each prototype gets close to 8 / 4 = 2 samples' worth
    """

    def __init__(self, n_iters: int = 3, reduce: Reduce | None = None) -> None:
        super().__init__()
        if n_iters < 0:
            raise ValueError(f"n_iters must be >= 0, got {n_iters}")
        self.n_iters = n_iters
        self.reduce = reduce or identity_reduce

    @torch.no_grad()
    def targets(self, teacher_logits: Tensor, temp: float) -> Tensor:
        _check_logits(teacher_logits)
        scores = _float(teacher_logits) / temp  # (N, K)
        n_rows, n_protos = scores.shape
        local_max = scores.max() if n_rows else scores.new_zeros(())
        # One all-reduce for: global row count B, number of processes, sum of per-process maxima.
        stats = self.reduce(torch.stack([scores.new_tensor(float(n_rows)), scores.new_ones(()), local_max]))
        n_global, shift = stats[0], stats[2] / stats[1]

        q = torch.exp(scores - shift).t()  # (K, N)
        q /= self.reduce(q.sum())
        for _ in range(self.n_iters):
            q /= self.reduce(q.sum(dim=1, keepdim=True))  # (K, 1) global prototype totals
            q /= n_protos
            q /= q.sum(dim=0, keepdim=True)  # (1, N) sample totals, local to this process
            q /= n_global
        return (q * n_global).t()

    def update(self, teacher_logits: Tensor) -> None:
        """Nothing to update: Sinkhorn-Knopp targets depend on the current batch only."""


def _check_logits(teacher_logits: Tensor, n_protos: int | None = None) -> None:
    if teacher_logits.ndim != 2:
        raise ValueError(
            f"teacher logits must be (N, K), got shape {tuple(teacher_logits.shape)}; "
            "flatten the views first, e.g. logits.flatten(0, -2)"
        )
    if n_protos is not None and teacher_logits.shape[1] != n_protos:
        raise ValueError(
            f"teacher logits have {teacher_logits.shape[1]} prototypes but the center has {n_protos}; "
            "construct SoftmaxCentering with out_dim equal to the head's output size"
        )
