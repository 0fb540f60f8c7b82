"""DINOLoss against explicit loops of cross-entropies, for both DINOv2 uses and the official weighting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import DINOLoss, SoftmaxCentering, dino_loss_term_count


def ce(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Batch-mean cross-entropy of one (student view, teacher view) pair, written out."""
    b = student_logits.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        log_p = F.log_softmax(student_logits[i].double() / temp, dim=-1)
        total -= (teacher_probs[i].double() * log_p).sum()
    return total / b


def assert_close64(loss: torch.Tensor, expected: torch.Tensor) -> None:
    """A float32 loss against a float64 reference."""
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def _inputs(s: int, t: int, b: int = 5, k: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(s, b, k, generator=g)
    teacher = torch.softmax(torch.randn(t, b, k, generator=g) / 0.07, dim=-1)
    return student, teacher


def test_local_crops_all_pairs():
    student, teacher = _inputs(s=4, t=2)
    loss = DINOLoss(student_temp=0.1)(student, teacher, skip_same_view=False)
    expected = sum(ce(teacher[j], student[i], 0.1) for i in range(4) for j in range(2))
    assert_close64(loss, expected)


def test_global_crops_skip_same_view():
    student, teacher = _inputs(s=2, t=2)
    loss = DINOLoss(student_temp=0.1)(student, teacher, skip_same_view=True)
    expected = ce(teacher[1], student[0], 0.1) + ce(teacher[0], student[1], 0.1)
    assert_close64(loss, expected)
    # the official construction: swap the teacher's views, mean over the 2B stacked rows, times 2
    swapped = torch.cat([teacher[1], teacher[0]])
    official = 2 * ce(swapped, student.flatten(0, 1), 0.1)
    assert_close64(loss, official)
    # more views: every ordered pair of different views
    student, teacher = _inputs(s=3, t=3, seed=1)
    loss = DINOLoss()(student, teacher, skip_same_view=True)
    expected = sum(ce(teacher[j], student[i], 0.1) for i in range(3) for j in range(3) if i != j)
    assert_close64(loss, expected)


def test_official_weighting():
    assert dino_loss_term_count(n_global_crops=2, n_local_crops=8) == 2 + 16
    assert dino_loss_term_count(n_global_crops=2, n_local_crops=0) == 3  # the official max(., 1) guard
    # with local crops the total is the plain mean over all pair terms
    local, teacher = _inputs(s=8, t=2, seed=2)
    glob, _ = _inputs(s=2, t=2, seed=3)
    fn = DINOLoss()
    total = (fn(local, teacher, skip_same_view=False) + fn(glob, teacher, skip_same_view=True)) / 18
    terms = [ce(teacher[j], local[i], 0.1) for i in range(8) for j in range(2)]
    terms += [ce(teacher[1], glob[0], 0.1), ce(teacher[0], glob[1], 0.1)]
    assert_close64(total, torch.stack(terms).mean())


def test_student_temperature():
    student, teacher = _inputs(s=1, t=1)
    for temp in (0.05, 0.1, 1.0):
        loss = DINOLoss(student_temp=temp)(student, teacher, skip_same_view=False)
        assert_close64(loss, ce(teacher[0], student[0], temp))


def test_gradient_reaches_student_only():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 6, requires_grad=True)
    teacher_logits = torch.randn(8, 6, requires_grad=True)
    probs = SoftmaxCentering(out_dim=6).targets(teacher_logits, temp=0.04).unflatten(0, (2, -1))
    loss = DINOLoss()(student, probs, skip_same_view=True)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_logits.grad is None
    # teacher probs that do carry grad are detached inside the loss
    t = torch.softmax(torch.randn(2, 4, 6), -1).requires_grad_()
    DINOLoss()(student, t, skip_same_view=False).backward()
    assert t.grad is None


def test_bfloat16_student_and_shape_errors():
    student, teacher = _inputs(s=2, t=2)
    loss = DINOLoss()(student.bfloat16(), teacher, skip_same_view=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, DINOLoss()(student.bfloat16().float(), teacher, skip_same_view=True))
    fn = DINOLoss()
    with pytest.raises(ValueError, match="unflatten"):
        fn(student.flatten(0, 1), teacher, skip_same_view=False)
    with pytest.raises(ValueError, match="agree"):
        fn(student[:, :3], teacher, skip_same_view=False)
    with pytest.raises(ValueError, match="same number of views"):
        fn(torch.randn(3, 5, 9), teacher, skip_same_view=True)
