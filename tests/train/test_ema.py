import pytest
import torch
from torch import nn

from dinolab.train.ema import ema_update_, ema_update_module_

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.BatchNorm1d(4))


def test_matches_formula_over_steps():
    teacher, student = _net(0), _net(1)
    expected = [p.detach().clone() for p in teacher.parameters()]
    for step, m in enumerate((0.9, 0.992, 0.5)):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))  # the student moves between updates
        ema_update_module_(teacher, student, m)
        expected = [m * t + (1 - m) * s for t, s in zip(expected, student.parameters())]
        for got, want in zip(teacher.parameters(), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_bit_exact_against_per_tensor_ops():
    t, s = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    want = [a.mul(0.99).add(b, alpha=1 - 0.99) for a, b in zip(t, s)]
    ema_update_(t, s, 0.99)
    for got, w in zip(t, want):
        assert torch.equal(got, w)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    teacher, student = _net(0), _net(1)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_module_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))
    ema_update_module_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_parameters_only_no_grad_and_buffers_untouched():
    teacher, student = _net(0), _net(1)
    student.train()(torch.randn(4, 8))  # give the student different BatchNorm running stats
    for p in student.parameters():
        p.requires_grad_(True)
    ema_update_module_(teacher, student, 0.5)
    assert all(p.grad_fn is None for p in teacher.parameters())
    assert torch.equal(teacher[3].running_mean, torch.zeros(4))  # DINOv2 averages parameters only


def test_name_mismatch_is_an_error():
    with pytest.raises(ValueError, match="names differ"):
        ema_update_module_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(1)], [], 0.9)
