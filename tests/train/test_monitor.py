"""Collapse monitor: each signal warns once, with the advice that fits it; healthy runs stay quiet."""

import logging
import math

import pytest

from dinolab.train.monitor import ADVICE, SHORT_RUN_ADVICE, CollapseMonitor

LOG_K = math.log(4096)


def _metrics(dino=5.5, in_use=800.0, spread=0.95):
    return {"prototypes_in_use": in_use, "cls_std_x_sqrt_d": spread, "dino": dino, "log_k": LOG_K}


def _run(monitor, steps, **kw):
    for it in range(steps):
        monitor.update(it, _metrics(**kw))


def test_healthy_run_gives_no_warning():
    m = CollapseMonitor(4096, grace=10, every=10)
    _run(m, 100)
    assert m.check(100) == [] and m.warnings == []
    final = m.summary()["final"]
    assert final["dino"] == pytest.approx(5.5) and final["log_k"] == pytest.approx(LOG_K)


@pytest.mark.parametrize("kw,kind,advice", [
    ({"in_use": 3.0}, "uses ~3.0 of 4096 prototypes", ADVICE),
    ({"spread": 0.02}, "spread 0.020", ADVICE),
    ({"dino": 0.97 * LOG_K}, "weak learning signal", SHORT_RUN_ADVICE),  # near log K, not equal
])
def test_each_signal_warns_once_with_its_advice(kw, kind, advice, caplog):
    m = CollapseMonitor(4096, grace=10, every=10)
    with caplog.at_level(logging.WARNING, logger="dinolab.train.monitor"):
        _run(m, 60, **kw)  # checked at 10, 20, ..., 50
    assert len(m.warnings) == 1, m.warnings
    assert kind in m.warnings[0] and m.warnings[0].endswith(advice)
    assert "iteration 10" in m.warnings[0]  # the first time it was seen
    assert [r.getMessage() for r in caplog.records] == m.warnings  # logged when found, not only at the end
    assert m.summary()["collapse_warnings"] == m.warnings


def test_no_warning_before_the_grace_period():
    m = CollapseMonitor(4096, grace=100, every=10)
    _run(m, 99, in_use=1.0, spread=0.0, dino=LOG_K)
    assert m.warnings == []
    m.update(100, _metrics(in_use=1.0, spread=0.0, dino=LOG_K))
    assert len(m.warnings) == 3


def test_short_run_advice_names_real_config_keys():
    from dinolab.config import load_config

    cfg = load_config("cpu-smoke", ["model.layerscale=null", "optim.momentum_teacher=0.98",
                                    "optim.final_momentum_teacher=0.996", "loss.teacher_temp=0.04",
                                    "loss.warmup_teacher_temp=0.04"])
    assert cfg.model.layerscale is None and cfg.loss.teacher_temp == 0.04
    for key in ("model.layerscale=null", "optim.momentum_teacher=0.98", "optim.final_momentum_teacher=0.996",
                "loss.teacher_temp=0.04", "loss.warmup_teacher_temp=0.04"):
        assert key in SHORT_RUN_ADVICE


def test_loss_plot_has_axis_labels(tmp_path, monkeypatch):
    import json

    import dinolab.train.monitor as monitor

    rows = [{"iteration": i, "loss": 9.0 - i, "dino": 5.0, "ibot": 4.0, "koleo": -0.1, "log_k": 8.3,
             "prototypes_in_use": 100.0, "cls_std_x_sqrt_d": 0.9} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    monkeypatch.setattr(monitor, "atomic_save_figure", lambda fig, path: figs.append(fig) or path)
    monitor.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    loss_ax, signal_ax = figs[0].axes[:2]
    assert "loss" in loss_ax.get_ylabel() and signal_ax.get_ylabel()  # was empty
    assert loss_ax.get_xlabel() == "iteration"
