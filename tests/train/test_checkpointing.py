import errno
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from dinolab.errors import DinolabError
from dinolab.train import checkpointing as ck


def _realistic_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.04)
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "center": torch.randn(1, 4),
        "epoch": 3,
        "loss_ema": 0.125,
        "arch": "vit_small",
        "config": {"lr": 1e-3, "layers": [1, 2], "name": "x", "flag": True, "none": None},
    }


def test_round_trip_weights_only(tmp_path):
    state = _realistic_state()
    path = ck.save_checkpoint(tmp_path, 42, state)
    assert path == tmp_path / "checkpoints" / "ckpt-00000042.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)  # everything passes the safe loader
    assert raw["iteration"] == 42 and set(raw["rng"]) >= {"python", "numpy", "torch"}

    got = ck.load_checkpoint(path, restore_rng=False)
    assert got["iteration"] == 42
    assert (got["epoch"], got["loss_ema"], got["arch"]) == (3, 0.125, "vit_small")
    assert got["config"] == state["config"]
    torch.testing.assert_close(got["center"], state["center"])
    for k, v in state["model"].items():
        torch.testing.assert_close(got["model"][k], v)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][k], v)

    model2 = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model2.load_state_dict(got["model"], strict=True)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, weight_decay=0.04)
    opt2.load_state_dict(got["optimizer"])


def _draw() -> tuple:
    return (
        random.random(),
        random.getrandbits(64),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
        torch.randint(0, 10**6, (2,)).tolist(),
    )


def test_rng_restore_replays_the_same_numbers(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()
    np.random.randn()  # leave numpy with a cached gaussian, the hardest state to round-trip
    path = ck.save_checkpoint(tmp_path, 1, {})
    first = _draw()
    ck.load_checkpoint(path, restore_rng=False)
    assert _draw() != first  # without restore the streams move on
    ck.load_checkpoint(path)
    assert _draw() == first


def test_keep_last_prunes_oldest(tmp_path):
    for it in (10, 20, 30, 40, 50):
        ck.save_checkpoint(tmp_path, it, {"x": it}, keep_last=2)
    assert [it for it, _ in ck.list_checkpoints(tmp_path)] == [40, 50]
    for it in (60, 70):
        ck.save_checkpoint(tmp_path, it, {}, keep_last=0)
    assert [it for it, _ in ck.list_checkpoints(tmp_path)] == [40, 50, 60, 70]
    # a lower iteration written last (rollback) is kept: the one just written is never pruned
    ck.save_checkpoint(tmp_path, 5, {}, keep_last=1)
    assert [it for it, _ in ck.list_checkpoints(tmp_path)] == [5]


def test_latest_checkpoint_highest_iteration_ignores_others(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    for it in (9, 100_000_000, 10):  # past 8 digits the numeric order still wins
        ck.save_checkpoint(tmp_path, it, {}, keep_last=0)
    folder = tmp_path / "checkpoints"
    (folder / ".ckpt-999999999.pt.abc.tmp").write_bytes(b"partial")
    (folder / "ckpt-999999999.pt.bak").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    assert ck.latest_checkpoint(tmp_path) == folder / "ckpt-100000000.pt"


def test_truncated_checkpoint_raises_and_names_previous(tmp_path):
    prev = ck.save_checkpoint(tmp_path, 1, {"w": torch.randn(64, 64)})
    path = ck.save_checkpoint(tmp_path, 2, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DinolabError, match="ckpt-00000002.pt") as err:
        ck.load_checkpoint(path)
    assert str(prev) in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(DinolabError, match="ckpt-00000002.pt"):
        ck.load_checkpoint(path)
    with pytest.raises(DinolabError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000003.pt")


def test_disk_full_inside_torch_save_is_one_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    good = ck.save_checkpoint(tmp_path, 1, {"x": 1})
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1000)}, f)  # some bytes reach the temp file first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DinolabError, match=r"ckpt-00000002\.pt \(No space left on device\); the previous "
                       r"checkpoint .*ckpt-00000001\.pt is intact") as err:
        ck.save_checkpoint(tmp_path, 2, {"x": 2}, keep_last=1)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]  # no temp file left
    assert ck.load_checkpoint(good)["x"] == 1


def test_stale_temp_files_are_removed_after_a_save(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [folder / ".ckpt-00000004.pt.k1ll3d.tmp", folder / ".ckpt-00000002.pt.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (folder / "notes.tmp").write_text("not ours")
    ck.save_checkpoint(tmp_path, 3, {"x": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000003.pt", "notes.tmp"]
    assert ck.remove_stale_temp_files(tmp_path / "nothing-here") == 0


_KILLED_WRITER = """
import sys, time, torch
from dinolab.train import checkpointing as ck
run = sys.argv[1]
ck.save_checkpoint(run, 1, {"w": torch.ones(4)})
real_save = torch.save
def slow_save(obj, f, *a, **k):
    f.write(b"x" * 100000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
ck.save_checkpoint(run, 2, {"w": torch.zeros(4)})
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    import subprocess
    import sys

    # ~5 s: a Python + torch subprocess
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()  # SIGKILL in the middle of the second write
        proc.wait(timeout=10)
    finally:
        proc.kill()
    folder = tmp_path / "checkpoints"
    assert [p.name for p in folder.glob(".ckpt-00000002.pt.*.tmp")]  # the half-written temp file stays ...
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-00000001.pt"  # ... and is never taken for a checkpoint
    assert torch.equal(ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["w"], torch.ones(4))
    ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)})  # the next save removes it
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]


def _wait_for(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_graceful_exit_sigterm_sets_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with ck.GracefulExit() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested)
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is only logged
        time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in before} == before


def test_graceful_exit_second_sigint_raises_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), ck.GracefulExit() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)  # the handler raises here
    assert signal.getsignal(signal.SIGINT) == before
    assert signal.getsignal(signal.SIGTERM) is not None


def test_graceful_exit_is_noop_outside_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def worker():
        with ck.GracefulExit() as stop:
            result["handler"] = signal.getsignal(signal.SIGTERM)
            result["requested"] = stop.requested

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == {"handler": before, "requested": False}
