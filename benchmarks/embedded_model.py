"""Build, measure and package the embedded default model (``src/dinolab/assets/embedded/``).

The model ``./serve.sh`` and ``./demo.sh`` use when no official weights are at hand: a ViT-Tiny/8
(6 blocks) pretrained by dinolab's own trainer (preset ``embedded-cpu``) on the natural images of
``../shared/data``, plus a CamVid linear segmentation head and a 7-Scenes linear depth head trained
on its frozen features. Each stage is resumable (re-run the same command) and writes what it
measured to ``<work>/results.json``; ``package`` and ``card`` write into the assets folder::

    python benchmarks/embedded_model.py                      # all stages, ~1.5 h on 2 CPU cores
    python benchmarks/embedded_model.py --stages eval,heads,card   # after training

Stages:
    data     extract Tiny-ImageNet-190 train/val, CIFAR-10 train, CamVid train, 7-Scenes train into
             ``<work>/data`` and write ``<work>/train_list.txt`` (CamVid and 7-Scenes 10 times each)
    train    ``dinolab train --config embedded-cpu --data <work>/train_list.txt`` into ``<work>/run``
    package  the EMA teacher as fp16 safetensors (+ architecture sidecar) into the assets folder
    eval     kNN (k=10, 20, the DINOv2 protocol) of the packaged fp16 model on Tiny-ImageNet-190 val
             (bank: 100 train images per class) and CIFAR-10 test (bank: 1,000 train images per
             class), 64-px inputs; the same for the same architecture with random weights (the floor)
    heads    ``dinolab seg train`` (CamVid, linear) and ``dinolab depth train`` (7-Scenes, lin1) on
             the packaged model; the heads are copied into the assets folder
    card     ``MODEL_CARD.md`` and ``model.json`` in the assets folder from the measured numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "dinolab" / "assets" / "embedded"
STAGES = ("data", "train", "package", "eval", "heads", "card")
REPEAT_SMALL = 10  # CamVid (367) and 7-Scenes (40) frames are listed this many times
BACKBONE_FILE = "backbone.safetensors"
SEG_HEAD_FILE = "seg_camvid_linear.pth"
DEPTH_HEAD_FILE = "depth_7scenes_lin1.pth"
KNN_SETS = {  # name: (bank, queries, bank images per class) relative to <work>/data, or dataset specs
    "tinyimagenet190": ("tin/train", "tin/val", 100),  # 19,000 of the 76,000 train images (CPU budget)
    "cifar10": ("cifar10:train", "cifar10:test", 1000),  # 10,000 of the 50,000
}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _shared(folder: str) -> Path:
    from dinolab.data.datasets import find_shared_data

    found, looked = find_shared_data(folder)
    if found is None:
        sys.exit(f"error: ../shared/data/{folder} not found (looked in {', '.join(map(str, looked))})")
    return found


def _run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _dinolab(*args: str) -> list[str]:
    return [sys.executable, "-m", "dinolab", *args]


def stage_data(work: Path) -> None:
    data = work / "data"
    jobs = [("tin", "tinyimagenet190", "train.tar.gz"), ("tin", "tinyimagenet190", "val.tar.gz"),
            ("cifar10/train", "cifar10", "train.tar.gz"), ("camvid/train", "camvid", "train.tar.gz"),
            ("sevenscenes_redkitchen/train", "sevenscenes_redkitchen", "train.tar.gz")]
    for dest, folder, archive in jobs:
        done = data / dest / f".{archive}.done"
        if done.exists():
            continue
        (data / dest).mkdir(parents=True, exist_ok=True)
        with tarfile.open(_shared(folder) / archive) as tf:
            tf.extractall(data / dest, filter="data")
        done.touch()

    def files(sub: str) -> list[str]:
        return sorted(str(p.relative_to(work)) for p in (data / sub).rglob("*") if p.is_file()
                      and not p.name.startswith("."))

    lines = files("tin/train") + files("cifar10/train")
    lines += (files("camvid/train/images") + files("sevenscenes_redkitchen/train/rgb")) * REPEAT_SMALL
    (work / "train_list.txt").write_text("\n".join(lines) + "\n")
    print(f"{work / 'train_list.txt'}: {len(lines)} lines")


def stage_train(work: Path, args: argparse.Namespace) -> None:
    _run(_dinolab("train", "--config", "embedded-cpu", "--data", str(work / "train_list.txt"),
                  f"train.output_dir={work / 'run'}", "--no-progress", *args.overrides))


def stage_package(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from dinolab.models import load_model

    teacher = work / "run" / "teacher_backbone.pth"
    model = load_model(teacher)
    ASSETS.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(ASSETS / BACKBONE_FILE), metadata={"format": "pt", "producer": "dinolab"})
    (ASSETS / BACKBONE_FILE).chmod(0o644)
    # the architecture sidecar the trainer wrote next to the teacher (load_model reads it for both files)
    shutil.copyfile(teacher.with_name(teacher.name + ".json"), ASSETS / (BACKBONE_FILE + ".json"))
    print(f"{ASSETS / BACKBONE_FILE}: {(ASSETS / BACKBONE_FILE).stat().st_size / 2**20:.2f} MiB")


def _spec(work: Path, s: str) -> str:
    return s if ":" in s else str(work / "data" / s)


def _random_init(work: Path) -> Path:
    """The embedded architecture with random weights (seed 0), saved as a checkpoint: the kNN floor."""
    import torch

    from dinolab.models.checkpoints import _sidecar_variant, save_official
    from dinolab.models.vit import DinoVisionTransformer

    path = work / "random_init.pth"
    if not path.exists():
        torch.manual_seed(0)
        variant = _sidecar_variant(ASSETS / BACKBONE_FILE)
        save_official(DinoVisionTransformer(**variant.model_kwargs()).eval(), path, variant)
    return path


def stage_eval(work: Path, results: dict) -> None:
    rows = results.setdefault("knn", {})
    models = {"embedded": str(ASSETS / BACKBONE_FILE), "random-init": str(_random_init(work))}
    for name, (bank, queries, per_class) in KNN_SETS.items():
        for row, model in models.items():
            out = work / f"knn-{name}-{row}"
            if not (out / "results.json").exists():
                _run(_dinolab("eval", "knn", "--train", _spec(work, bank), "--test", _spec(work, queries),
                              "--few-shot", str(per_class), "--resize", "64", "--crop", "64", "--ks", "10",
                              "20", "--num-workers", "1", "--out", str(out), "--model", model))
            res = json.loads((out / "results.json").read_text())
            rows[f"{name}/{row}"] = res
    results["knn_command"] = ("dinolab eval knn --train BANK --test QUERIES --few-shot N --resize 64 --crop 64 "
                              "--model src/dinolab/assets/embedded/" + BACKBONE_FILE)


def stage_heads(work: Path, args: argparse.Namespace) -> None:
    backbone = str(ASSETS / BACKBONE_FILE)
    seg, depth = work / "seg-camvid-linear", work / "depth-7scenes-lin1"
    if not (seg / "results.json").exists():
        _run(_dinolab("seg", "train", "--train", "camvid:train", "--val", "camvid:val", "--model", backbone,
                      "--head", "linear", "--epochs", str(args.seg_epochs), "--out", str(seg), "--no-progress"))
    if not (depth / "results.json").exists():
        _run(_dinolab("depth", "train", "--train", "7scenes:train", "--val", "7scenes:val", "--model",
                      backbone, "--head", "lin1", "--epochs", str(args.depth_epochs), "--out", str(depth),
                      "--no-progress"))
    shutil.copyfile(seg / "head.pth", ASSETS / SEG_HEAD_FILE)
    shutil.copyfile(depth / "head.pth", ASSETS / DEPTH_HEAD_FILE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "embedded",
                    help="work folder: data, training run, evaluation runs (default .cache/embedded)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--seg-epochs", type=int, default=20)
    ap.add_argument("--depth-epochs", type=int, default=20)
    ap.add_argument("overrides", nargs="*", help="a.b=c overrides for the train stage")
    args = ap.parse_args()
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["machine"] = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {_threads()}"
    from model_card import write_card  # benchmarks/model_card.py

    run_stage = {"data": lambda: stage_data(work), "train": lambda: stage_train(work, args),
                 "package": lambda: stage_package(work), "eval": lambda: stage_eval(work, results),
                 "heads": lambda: stage_heads(work, args), "card": lambda: write_card(work, results, ASSETS)}
    for stage in (s for s in STAGES if s in stages):
        t0 = time.perf_counter()
        run_stage[stage]()
        results.setdefault("stage_wall_s", {})[stage] = round(time.perf_counter() - t0, 1)
        results_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
