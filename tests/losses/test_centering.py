"""Teacher target rules: softmax centering (EMA by hand) and Sinkhorn-Knopp (reference, 2 ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolab.losses import SinkhornKnopp, SoftmaxCentering, TeacherCentering


def sinkhorn_reference(logits: np.ndarray, temp: float, n_iters: int) -> np.ndarray:
    """The SwAV / DINOv2 recipe written out in float64 numpy, (B, K) in and out."""
    q = np.exp(logits.astype(np.float64) / temp).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True) * k  # every prototype gets 1/K
        q /= q.sum(axis=0, keepdims=True) * b  # every sample gets 1/B
    return (q * b).T


# ---- softmax centering --------------------------------------------------------------------------


def test_softmax_centering_ema_by_hand():
    c = SoftmaxCentering(out_dim=2, momentum=0.9)
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # batch mean (2, 3)
    # the first step is centered with the zero center
    torch.testing.assert_close(c.targets(first, temp=0.5), torch.softmax(first / 0.5, dim=-1))
    c.update(first)
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.3]]))  # 0.9 * 0 + 0.1 * (2, 3)
    second = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])  # batch mean (1, 1)
    expected = torch.softmax((second - torch.tensor([0.2, 0.3])) / 0.5, dim=-1)
    torch.testing.assert_close(c.targets(second, temp=0.5), expected)
    c.update(second)
    torch.testing.assert_close(c.center, torch.tensor([[0.28, 0.37]]))  # 0.9 * (.2, .3) + 0.1 * (1, 1)


def test_softmax_centering_temperature_and_state():
    torch.manual_seed(0)
    c = SoftmaxCentering(out_dim=16)
    c.update(torch.randn(8, 16))
    logits = torch.randn(5, 16)
    for temp in (0.04, 0.07, 1.0):
        expected = torch.softmax((logits - c.center) / temp, dim=-1)
        torch.testing.assert_close(c.targets(logits, temp), expected)
    entropy = [-(p * p.log()).sum(-1).mean() for p in (c.targets(logits, t) for t in (0.04, 1.0))]
    assert entropy[0] < entropy[1]  # a lower teacher temperature sharpens
    assert set(c.state_dict()) == {"center"} and c.center.shape == (1, 16)
    assert isinstance(c, TeacherCentering)


def test_softmax_centering_two_ranks_use_global_mean(run_ranks):
    torch.manual_seed(1)
    full = torch.randn(7, 5, dtype=torch.float64)
    ref = SoftmaxCentering(out_dim=5)
    ref.update(full)
    ref.update(full * 2)

    def rank_fn(rows):
        def fn(reduce):
            c = SoftmaxCentering(out_dim=5, reduce=reduce)
            c.update(full[rows])
            c.update(full[rows] * 2)
            return c.center

        return fn

    # uneven split (4 + 3 rows): the count comes from the reduce, not from N * world
    for center in run_ranks([rank_fn(slice(0, 4)), rank_fn(slice(4, 7))]):
        torch.testing.assert_close(center, ref.center)


def test_softmax_centering_bad_input_and_no_grad():
    c = SoftmaxCentering(out_dim=4)
    with pytest.raises(ValueError, match="out_dim"):
        c.targets(torch.randn(3, 5), 0.1)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        c.update(torch.randn(2, 3, 4))
    logits = torch.randn(3, 4, requires_grad=True)
    assert not c.targets(logits, 0.1).requires_grad
    c.update(torch.empty(0, 4))  # no rows anywhere: the center stays
    torch.testing.assert_close(c.center, torch.zeros(1, 4))


# ---- Sinkhorn-Knopp -----------------------------------------------------------------------------


def test_sinkhorn_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(12, 6)
    for n_iters in (0, 1, 3):
        probs = SinkhornKnopp(n_iters=n_iters).targets(logits, temp=0.1)
        assert probs.dtype == torch.float32 and probs.shape == (12, 6)
        ref = sinkhorn_reference(logits.numpy(), 0.1, n_iters)
        np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    b, k = 32, 8
    logits = torch.randn(b, k, dtype=torch.float64)
    probs = SinkhornKnopp(n_iters=3).targets(logits, temp=0.5)
    # the last step normalises samples: each sample's distribution sums to 1 exactly
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(b, dtype=torch.float64))
    # prototypes are used about equally (B / K each); 3 iterations get close to the converged answer
    target = torch.full((k,), b / k, dtype=torch.float64)
    converged = SinkhornKnopp(n_iters=500).targets(logits, temp=0.5)
    torch.testing.assert_close(converged.sum(dim=0), target, rtol=1e-9, atol=1e-9)
    err_3 = (probs.sum(dim=0) - target).abs().max()
    err_0 = (SinkhornKnopp(n_iters=0).targets(logits, temp=0.5).sum(dim=0) - target).abs().max()
    assert err_3 < 0.1 * b / k and err_3 < err_0 / 10
    assert (probs - converged).abs().max() < 0.05


def test_sinkhorn_two_ranks_equal_full_batch(run_ranks):
    torch.manual_seed(2)
    full = torch.randn(11, 7)
    ref = SinkhornKnopp().targets(full, temp=0.07)
    split = [slice(0, 6), slice(6, 11)]  # uneven: B comes from the reduce
    outs = run_ranks([lambda reduce, s=s: SinkhornKnopp(reduce=reduce).targets(full[s], temp=0.07) for s in split])
    for s, out in zip(split, outs, strict=True):
        torch.testing.assert_close(out, ref[s], rtol=1e-5, atol=1e-7)


def test_sinkhorn_large_logits_stay_finite():
    torch.manual_seed(3)
    logits = torch.randn(10, 5) + 10  # logits / temp ~ 100: exp overflows float32 without a shift
    assert torch.isinf(torch.exp(logits / 0.1)).any()
    probs = SinkhornKnopp().targets(logits, temp=0.1)
    assert torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.numpy(), sinkhorn_reference(logits.numpy(), 0.1, 3), rtol=1e-4, atol=1e-7)


def test_sinkhorn_half_input_no_grad_and_stateless():
    logits = torch.randn(6, 4, requires_grad=True)
    sk = SinkhornKnopp()
    probs = sk.targets(logits.bfloat16(), temp=0.1)
    assert probs.dtype == torch.float32 and not probs.requires_grad
    sk.update(logits)  # no-op
    assert sk.state_dict() == {}
