"""Re-runs and resumes of `dinolab train`: finished runs, changed settings, kills between checkpoints,
stale temp files, non-finite weights, disk full, batches of only bad images."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.config import load_config
from dinolab.errors import DinolabError
from dinolab.models import load_model
from dinolab.train import loop
from tests.conftest import random_pngs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = random_pngs(tmp_path_factory.mktemp("imgs"), 40, 36, "{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished cpu-smoke run (6 iterations, checkpoints at 3 and 6). Its config keeps the default
    highres.global_size=518, which is no multiple of the patch size 4 (no high-res phase is run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--config", "cpu-smoke", "--data", str(images), "--no-progress",
                 f"train.output_dir={run}"]) == 0
    torch.set_num_threads(threads)
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _train(images, run, *extra):
    return main(["train", "--config", "cpu-smoke", "--data", str(images), "--no-progress",
                 f"train.output_dir={run}", *extra])


def _iterations(run):
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rerun_of_a_finished_run_says_so_and_exits_0(images, finished, tmp_path, capsys, caplog):
    run = _copy(finished, tmp_path)
    caplog.set_level("INFO", logger="dinolab.train.loop")
    assert _train(images, run) == 0
    assert json.loads(capsys.readouterr().out)["already_finished"] is True
    assert "already finished (6 iterations): nothing to do" in caplog.text
    assert _iterations(run) == [1, 2, 3, 4, 5, 6]  # nothing logged twice


def test_run_killed_before_its_export_exports_on_rerun(images, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    for name in ("teacher_backbone.pth", "results.json", "loss.png"):
        (run / name).unlink()  # killed after the last checkpoint, before the export
    assert _train(images, run) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["already_finished"] is True and res["iterations"] == 6
    a = torch.load(finished / "teacher_backbone.pth", weights_only=True)
    b = torch.load(run / "teacher_backbone.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the checkpoint's teacher
    assert (run / "loss.png").is_file() and json.loads((run / "results.json").read_text())["iterations"] == 6
    assert load_model(run / "teacher_backbone.pth").patch_size == 4


def test_resume_with_other_settings_is_refused_unless_forced(images, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "ckpt-00000006.pt").unlink()  # killed after iteration 3
    config = (run / "config.yaml").read_bytes()
    other = tmp_path / "other"
    shutil.copytree(images, other)
    (other / "000.png").unlink()
    assert _train(other, run, "optim.base_lr=1e-3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to resume" in err and "--force" in err
    assert "optim.base_lr: 0.004 -> 0.001" in err and f"data.source: '{images.resolve()}' -> '{other.resolve()}'" in err
    assert "data.n_images: 40 -> 39" in err
    assert (run / "config.yaml").read_bytes() == config and not (run / "resumes.jsonl").exists()

    assert _train(other, run, "optim.base_lr=1e-3", "--force") == 0
    assert (run / "config.yaml").read_bytes() == config  # the config the run started with
    (row,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert row["forced"] is True and row["iteration"] == 3 and row["checkpoint"] == "ckpt-00000003.pt"
    assert row["changes"]["optim.base_lr"] == [0.004, 0.001] and row["data"]["source"] == str(other.resolve())
    assert torch.load(run / "checkpoints" / "ckpt-00000006.pt", weights_only=True)["config"]["optim"]["base_lr"] \
        == 0.001  # later checkpoints hold the settings they were trained with


def test_resume_after_changing_the_depth_is_one_line(images, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "ckpt-00000006.pt").unlink()
    assert _train(images, run, "model.depth=3") == 2
    assert "model.depth: 2 -> 3" in capsys.readouterr().err
    assert _train(images, run, "model.depth=3", "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt-00000003.pt does not fit the model this config builds" in err


class _Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs."""


def test_kill_between_checkpoints_logs_each_iteration_once(images, finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    step = loop._step

    def dies_at_5(r, batch, it):
        if it == 4:  # iterations 1-4 logged, checkpoint at 3
            raise _Killed
        return step(r, batch, it)

    monkeypatch.setattr(loop, "_step", dies_at_5)
    with pytest.raises(_Killed):
        _train(images, run)
    assert _iterations(run) == [1, 2, 3, 4]
    stale = run / "checkpoints" / ".ckpt-00000006.pt.k1ll3d.tmp"  # a checkpoint write killed mid-way
    stale.write_bytes(b"half")
    monkeypatch.setattr(loop, "_step", step)
    assert _train(images, run) == 0
    assert _iterations(run) == [1, 2, 3, 4, 5, 6] and not stale.exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    # an exact resume: the same float32 computations (another thread count may reorder sums, ~1e-7)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    (row,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert row["forced"] is False and row["iteration"] == 3 and row["changes"] == {}


_KILLED_TRAINER = """
import sys, time
from dinolab.cli import main
from dinolab.train import loop
step = loop._step
def slow(run, batch, it):
    if it >= 4:
        time.sleep(30)  # the parent kills it here
    return step(run, batch, it)
loop._step = slow
main(sys.argv[1:])
"""


@pytest.mark.slow  # a Python + torch subprocess: ~5 s of CPU, minutes of wall time on a loaded 2-core machine
def test_kill_9_during_training_resumes_and_logs_each_iteration_once(images, tmp_path):
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = ["train", "--config", "cpu-smoke", "--data", str(images), "--no-progress", f"train.output_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINER, *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(_iterations(run)) >= 4:
                break
            time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert _iterations(run) == [1, 2, 3, 4]
    assert main(args) == 0
    assert _iterations(run) == [1, 2, 3, 4, 5, 6] and (run / "teacher_backbone.pth").is_file()


def test_non_finite_weights_are_never_checkpointed_or_exported(images, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    step = loop._step

    def poisons_the_teacher(r, batch, it):
        m = step(r, batch, it)
        if it == 3:
            with torch.no_grad():
                r.plain.teacher["backbone"].cls_token.fill_(float("nan"))
        return m

    monkeypatch.setattr(loop, "_step", poisons_the_teacher)
    assert _train(images, run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no longer finite at iteration 6" in err and "ckpt-00000003.pt" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000003.pt"]
    assert not (run / "teacher_backbone.pth").exists()


def test_export_refuses_a_non_finite_teacher(tmp_path):
    from dinolab.models import create_model
    from dinolab.train.monitor import CollapseMonitor

    teacher = create_model("vit_tiny_patch4", img_size=32, depth=2)
    with torch.no_grad():
        teacher.pos_embed.fill_(float("inf"))
    with pytest.raises(DinolabError, match="not finite .*pos_embed.*not exporting"):
        loop._finish(tmp_path, teacher, CollapseMonitor(out_dim=8), 6, loop._Counts(), 0.0, None)
    assert not (tmp_path / "teacher_backbone.pth").exists()


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous(images, tmp_path, monkeypatch, capsys):
    from dinolab.train import checkpointing

    run = tmp_path / "run"
    real_save = torch.save

    def full_at_6(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("iteration") == 6:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", full_at_6)
    assert _train(images, run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "ckpt-00000003.pt is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000003.pt"]
    assert checkpointing.load_checkpoint(run / "checkpoints" / "ckpt-00000003.pt")["iteration"] == 3


def _mostly_bad(root, good):
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        if i < good:
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        else:
            (root / f"{i:03d}.png").write_bytes(b"not an image")
    return root


def test_batches_of_only_bad_images_with_workers_are_skipped_and_counted(tmp_path, capsys):
    data = _mostly_bad(tmp_path / "data", good=6)
    assert _train(data, tmp_path / "run", "train.num_workers=1", "train.batch_size_per_gpu=2") == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["skipped_batches"] >= 1 and res["skipped_images"] >= 2 * res["skipped_batches"]
    assert res["skipped_batches"] + len(_iterations(tmp_path / "run")) == 6  # every other step trained


def test_only_bad_images_with_workers_is_one_line(tmp_path, monkeypatch, capsys):
    data = _mostly_bad(tmp_path / "data", good=0)
    assert _train(data, tmp_path / "a", "train.num_workers=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no training step ran (6 of 6 batches held no decodable image" in err
    assert not (tmp_path / "a" / "checkpoints").exists()  # nothing learnt: no checkpoint for a re-run to export
    monkeypatch.setattr(loop, "MAX_EMPTY", 3)
    assert _train(data, tmp_path / "b", "train.num_workers=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 batches in a row held no decodable image (48 images skipped" in err


def test_resume_changes_compare_what_is_learnt_not_how_it_runs():
    from dinolab.config import config_to_dict
    from dinolab.train.rundir import resume_changes

    old = config_to_dict(load_config("cpu-smoke"))
    new = config_to_dict(load_config("cpu-smoke", ["train.output_dir=moved", "train.num_workers=4",
                                                    "train.parallel=fsdp", "crops.global_scale=[0.4,1.0]"]))
    data = {"source": "/d", "n_images": 40}
    assert resume_changes({"config": old, "data": data}, new, data) == {"crops.global_scale": [[0.35, 1.0], [0.4, 1.0]]}
    assert resume_changes({"config": old}, old, data) == {}  # a checkpoint without a data record: not compared


def test_truncate_logs_drops_later_rows_and_a_line_cut_by_a_kill(tmp_path):
    from dinolab.train.rundir import truncate_logs

    rows = [json.dumps({"iteration": i, "loss": 1.0}) for i in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"iteration": 5, "lo')
    (tmp_path / "knn.jsonl").write_text(json.dumps({"iteration": 2, "knn_top1": 10.0}) + "\n")
    truncate_logs(tmp_path, 3)
    assert _iterations(tmp_path) == [1, 2, 3]
    assert (tmp_path / "knn.jsonl").read_text().count("\n") == 1
