"""KoLeoLoss against brute-force nearest neighbours (scipy distances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from dinolab.losses import KoLeoLoss


def koleo_reference(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)  # nearest *other* sample
    return float(-np.log(d.min(axis=1) + eps).mean())


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    for b, dim in ((2, 3), (7, 5), (32, 16)):
        x = rng.standard_normal((b, dim)).astype(np.float32)
        loss = KoLeoLoss()(torch.from_numpy(x))
        assert loss.dtype == torch.float32
        np.testing.assert_allclose(loss.item(), koleo_reference(x), rtol=1e-5, atol=1e-6)


def test_scale_invariant_and_spread_is_lower():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    torch.testing.assert_close(KoLeoLoss()(x), KoLeoLoss()(3 * x))
    clumped = x * 0.01 + torch.ones(8)  # all directions nearly equal: neighbours are close
    assert KoLeoLoss()(clumped) > KoLeoLoss()(x)


def test_duplicates_are_finite_and_gradient_flows():
    x = torch.randn(6, 4)
    x[3] = x[1]
    x.requires_grad_()
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and loss > 2 * 15 / 6  # 2 of 6 samples at a ~1e-8 distance
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_autocast_runs_in_float32_and_errors():
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, KoLeoLoss()(x))
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 5))
