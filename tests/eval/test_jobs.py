"""The evaluation jobs and `dinolab eval` end to end on a tiny ImageFolder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.data.datasets import load_labeled
from dinolab.eval import jobs
from dinolab.models import create_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _folder(root, n_per_class, seed):
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("cls")
    return load_labeled(_folder(base / "train", 12, 0)), load_labeled(_folder(base / "test", 4, 1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch8", depth=4)
    with torch.no_grad():  # LayerScale 1 instead of 1e-5: a random model whose CLS token sees the image
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return m


KW = {"resize": 32, "crop": 32, "batch_size": 16, "device": "cpu", "progress": False}


def test_knn_job_writes_run_folder(model, data, tmp_path):
    res = jobs.run_knn(model, *data, ks=(1, 5), out_dir=tmp_path, **KW)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["top1"] == {k: pytest.approx(v) for k, v in res["top1"].items()}
    assert on_disk["train"]["hash"] == jobs.dataset_hash(data[0]) and on_disk["test"]["n"] == 12
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "per_class.json").read_text())) == set(COLOURS)


def test_logreg_and_linear_jobs_separate_colours(model, data, tmp_path):
    lr = jobs.run_logreg(model, *data, val_fraction=0.25, out_dir=tmp_path / "lr", Cs=(0.1, 10.0), **KW)
    assert lr["headline"]["value"] == 100.0
    lin = jobs.run_linear(model, *data, augment=False, epochs=5, val_fraction=0.25, out_dir=tmp_path / "lin",
                          lrs=(1e-2, 1e-1), **KW)
    assert lin["held_out"]["test_top1"] == 100.0 and (tmp_path / "lin" / "classifier.pth").exists()
    assert "linear" in jobs.format_table(lin) and "held_out" in jobs.format_table(lin)


def test_dataset_hash_depends_on_labels(data):
    train = data[0]
    flipped = train.subset(range(len(train)))
    flipped.labels = flipped.labels[::-1].copy()
    assert jobs.dataset_hash(train) != jobs.dataset_hash(flipped)


def test_cli_eval_knn(data, tmp_path, capsys):
    train_dir = tmp_path / "tr"
    _folder(train_dir, 3, 2)
    rc = main(["eval", "knn", "--train", str(train_dir), "--test", str(train_dir), "--model", "vit_tiny_patch8",
               "--random-init", "--resize", "32", "--crop", "32", "--ks", "1", "--out", str(tmp_path / "run"),
               "--device", "cpu"])
    assert rc == 0 and (tmp_path / "run" / "results.json").exists()
    assert "k=   1" in capsys.readouterr().out


def test_cli_eval_reports_missing_dataset_in_one_line(tmp_path, capsys):
    rc = main(["eval", "knn", "--train", str(tmp_path / "nope"), "--test", str(tmp_path / "nope"),
               "--model", "vit_tiny_patch8", "--random-init"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and err.count("\n") == 1


def test_cli_eval_limit_counts_and_overwrite(tmp_path, capsys):
    """--limit / --test-limit pick seeded subsets; results.json counts listed, scored and skipped images;
    a finished run folder is not replaced without --overwrite."""
    _folder(tmp_path / "tr", 4, 2)  # 12 images
    _folder(tmp_path / "te", 3, 3)  # 9 images, one of them unreadable
    (tmp_path / "te" / "red" / "0.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    argv = ["eval", "knn", "--train", str(tmp_path / "tr"), "--test", str(tmp_path / "te"), "--model",
            "vit_tiny_patch8", "--random-init", "--resize", "32", "--crop", "32", "--ks", "1", "--out", str(run),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    full = json.loads((run / "results.json").read_text())
    assert (full["train"]["n_listed"], full["train"]["n_scored"], full["train"]["n_skipped"]) == (12, 12, 0)
    assert (full["test"]["n_listed"], full["test"]["n_scored"], full["test"]["n_skipped"]) == (9, 8, 1)
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # the finished run is kept
    assert main([*argv, "--limit", "6", "--test-limit", "9", "--overwrite"]) == 0
    small = json.loads((run / "results.json").read_text())
    assert small["train"]["n_listed"] == 6 and small["test"]["n_listed"] == 9 and small["test"]["n_skipped"] == 1
    assert main([*argv, "--limit", "5", "--overwrite"]) == 0  # --limit alone: both splits
    both = json.loads((run / "results.json").read_text())
    assert both["train"]["n_listed"] == 5 and both["test"]["n_listed"] == 5
    assert main([*argv, "--few-shot", "2", "--overwrite"]) == 0
    assert json.loads((run / "results.json").read_text())["train"]["n_listed"] == 6  # 2 per class
