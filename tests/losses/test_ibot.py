"""iBOTPatchLoss against a loop over masked patches and against the dense per-image formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import iBOTPatchLoss, patch_weights


def _batch(seed: int = 0, n_images: int = 4, n_patches: int = 10, k: int = 7):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_images, n_patches, generator=g) < 0.4
    masks[0] = False  # an image without masked patches still counts in n_images
    masks[1, :3] = True
    student = torch.randn(n_images, n_patches, k, generator=g)  # dense (images, patches, K)
    teacher = torch.softmax(torch.randn(n_images, n_patches, k, generator=g) / 0.07, dim=-1)
    return masks, student, teacher


def test_patch_weights():
    masks = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    torch.testing.assert_close(patch_weights(masks), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    with pytest.raises(ValueError, match="bool"):
        patch_weights(masks.float())


def test_matches_loop_over_patches():
    masks, student, teacher = _batch()
    s, t, w = student[masks], teacher[masks], patch_weights(masks)  # (M, K), (M, K), (M,)
    loss = iBOTPatchLoss(student_temp=0.1)(s, t, w, n_images=masks.shape[0])
    expected = torch.zeros((), dtype=torch.float64)
    for i in range(masks.shape[0]):
        n_masked = int(masks[i].sum())
        for p in range(masks.shape[1]):
            if masks[i, p]:
                log_p = F.log_softmax(student[i, p].double() / 0.1, dim=-1)
                expected -= (teacher[i, p].double() * log_p).sum() / n_masked
    torch.testing.assert_close(loss.double(), expected / masks.shape[0])


def test_equals_mean_over_images_of_masked_mean():
    masks, student, teacher = _batch(seed=1)
    loss = iBOTPatchLoss(student_temp=0.2)(student[masks], teacher[masks], patch_weights(masks), masks.shape[0])
    # dense form (official iBOTPatchLoss.forward): per-image mean over masked patches, mean over images
    ce = -(teacher * F.log_softmax(student / 0.2, dim=-1)).sum(-1)  # (images, patches)
    per_image = (ce * masks).sum(-1) / masks.sum(-1).clamp(min=1)
    torch.testing.assert_close(loss, per_image.mean())


def test_gradient_reaches_student_only_and_errors():
    masks, student, teacher = _batch()
    s = student[masks].clone().requires_grad_()
    t = teacher[masks].clone().requires_grad_()
    iBOTPatchLoss()(s, t, patch_weights(masks), masks.shape[0]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    fn = iBOTPatchLoss()
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        fn(s[:, :3], t, patch_weights(masks), 4)
    with pytest.raises(ValueError, match="weights"):
        fn(s, t, torch.ones(2), 4)
