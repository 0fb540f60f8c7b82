import math

import numpy as np
import pytest

from dinolab.train.schedules import build_schedules, cosine_schedule, scale_lr


def test_cosine_length_and_endpoints():
    s = cosine_schedule(1.0, 0.1, 100)
    assert s.shape == (100,) and s.dtype == np.float64
    assert s[0] == 1.0
    # official formula: i / n with i < n, so the last value is one step short of `final`
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert s[-1] > 0.1 and s[-1] - 0.1 < 1e-3
    assert s[50] == pytest.approx(0.55)  # half way down the cosine: the mean of base and final


def test_cosine_freeze_then_linear_warmup():
    s = cosine_schedule(2.0, 0.0, 50, warmup_iters=11, start_warmup=1.0, freeze_iters=5)
    assert len(s) == 50
    np.testing.assert_array_equal(s[:5], 0.0)
    warm = s[5:16]
    np.testing.assert_allclose(np.diff(warm), 0.1)  # linear: 1.0 -> 2.0 in 10 equal steps
    assert warm[0] == 1.0 and warm[-1] == 2.0
    assert s[16] == 2.0  # cosine starts at base


def test_cosine_monotone():
    down = cosine_schedule(1.0, 1e-6, 200, warmup_iters=20)
    assert np.all(np.diff(down[:20]) > 0) and np.all(np.diff(down[20:]) <= 0)
    up = cosine_schedule(0.04, 0.4, 200)
    assert np.all(np.diff(up) >= 0)


def test_cosine_rejects_too_long_warmup():
    with pytest.raises(ValueError, match="exceed total_iters"):
        cosine_schedule(1.0, 0.0, 10, warmup_iters=8, freeze_iters=3)
    assert len(cosine_schedule(1.0, 0.0, 10, warmup_iters=10)) == 10  # all warm-up is fine


def test_build_schedules_official_defaults():
    ipe, epochs = 10, 100
    s = build_schedules(total_iters=epochs * ipe, iters_per_epoch=ipe, base_lr=0.004)
    for arr in (s.lr, s.wd, s.momentum, s.teacher_temp, s.last_layer_lr):
        assert arr.shape == (1000,)
    # lr: warm-up 0 -> base over 10 epochs, then cosine towards min_lr
    assert s.lr[0] == 0.0 and s.lr[10 * ipe - 1] == 0.004 and s.lr[10 * ipe] == 0.004
    assert 1e-6 < s.lr[-1] < 1e-5
    # wd 0.04 -> 0.4 and momentum 0.992 -> 1, cosine without warm-up
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4, abs=1e-4)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    # teacher temperature: 0.04 -> 0.07 over 30 epochs, then constant
    assert s.teacher_temp[0] == 0.04
    assert s.teacher_temp[30 * ipe - 1] == pytest.approx(0.07)
    np.testing.assert_array_equal(s.teacher_temp[30 * ipe :], 0.07)
    # last layer frozen during epoch 0 only, then identical to lr
    np.testing.assert_array_equal(s.last_layer_lr[:ipe], 0.0)
    np.testing.assert_array_equal(s.last_layer_lr[ipe:], s.lr[ipe:])
    assert s.last_layer_lr[ipe] > 0


def test_schedules_at_holds_last_value_past_the_end():
    s = build_schedules(total_iters=40, iters_per_epoch=4, base_lr=1.0, warmup_epochs=2)
    v = s.at(12)
    assert (v.lr, v.wd, v.momentum) == (s.lr[12], s.wd[12], s.momentum[12])
    assert s.at(10_000) == s.at(39)
    with pytest.raises(ValueError):
        s.at(-1)


def test_short_run_clips_teacher_temp_warmup():
    s = build_schedules(total_iters=20, iters_per_epoch=1, base_lr=1.0, warmup_epochs=2)
    assert s.teacher_temp[0] == 0.04 and s.teacher_temp[-1] < 0.07  # still warming up at the end


def test_scale_lr():
    assert scale_lr(0.004, 1024) == pytest.approx(0.004)
    assert scale_lr(0.004, 256) == pytest.approx(0.002)  # sqrt(1/4)
    assert scale_lr(0.004, 2048, rule="linear") == pytest.approx(0.008)
    assert scale_lr(1e-3, 512, rule="linear", reference=256) == pytest.approx(2e-3)
    assert scale_lr(0.004, 64, rule="none") == 0.004
    with pytest.raises(ValueError, match="unknown"):
        scale_lr(0.004, 64, rule="cubic")  # type: ignore[arg-type]
