"""Pretrain on CIFAR-10 train and report kNN top-1 (k=20, T=0.07) on CIFAR-10 test against wall time.

    python benchmarks/pretrain_cifar10.py --profile cpu    # a budget that fits ~15 min of 2 CPU cores
    python benchmarks/pretrain_cifar10.py --profile gpu    # the `cifar10` preset (ViT-S/4, 200 epochs)

Extra `a.b=c` arguments override the profile's config. Results: JSON with the config, training wall
time, images/s and the kNN curve (results/pretrain_cifar10-<profile>.json); the run folder is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dinolab.config import config_to_dict, load_config
from dinolab.train.loop import train

PROFILES = {
    # 2 CPU cores: a 6-block ViT-Ti/4, 4 local crops, a small head; 10 "epochs" of 13 steps x 128 images.
    # Short-run settings as in the `small-cpu` preset (see its comments): no LayerScale, a teacher
    # that follows the student (EMA 0.98 -> 0.996) and sharp targets (teacher temperature 0.04).
    "cpu": ["model.arch=vit_tiny_patch4", "model.depth=6", "crops.n_local=4", "head.out_dim=2048",
            "head.hidden_dim=512", "head.bottleneck_dim=128", "train.batch_size_per_gpu=128",
            "train.epochs=10", "train.iters_per_epoch=13", "optim.warmup_epochs=1",
            "model.layerscale=null", "optim.momentum_teacher=0.98", "optim.final_momentum_teacher=0.996",
            "loss.teacher_temp=0.04", "loss.warmup_teacher_temp=0.04",
            "train.num_workers=1", "train.precision=fp32", "train.eval_every=0", "train.checkpoint_every=65"],
    # the previous CPU profile (official LayerScale / EMA / temperature schedule), kept for comparison
    "cpu-official-schedules": ["model.arch=vit_tiny_patch4", "model.depth=6", "crops.n_local=4",
                               "head.out_dim=2048", "head.hidden_dim=512", "head.bottleneck_dim=128",
                               "train.batch_size_per_gpu=128", "train.epochs=10", "train.iters_per_epoch=13",
                               "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=3", "train.num_workers=1",
                               "train.precision=fp32", "train.eval_every=0", "train.checkpoint_every=65"],
    "gpu": [],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/pretrain_cifar10-<profile>)")
    ap.add_argument("--json", type=Path, default=None,
                    help="summary file (default benchmarks/results/pretrain_cifar10-<profile>.json)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = args.out or Path("runs") / f"pretrain_cifar10-{args.profile}"
    cfg = load_config("cifar10", PROFILES[args.profile] + [f"train.output_dir={out}"] + args.overrides)
    t0 = time.perf_counter()
    res = train(cfg, "cifar10:train", progress=False, eval_train="cifar10:train", eval_test="cifar10:test")
    total = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "profile": args.profile, "machine": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "train_wall_s": res.get("train_wall_s_this_session"), "total_wall_s_incl_eval": total,
        "images_per_s_final": metrics[-1]["images_per_s"], "knn": res.get("knn"),
        "collapse": {k: res.get(k) for k in ("final", "collapse_warnings")}, "config": config_to_dict(cfg),
    }
    path = args.json or Path(__file__).parent / "results" / f"pretrain_cifar10-{args.profile}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: summary[k] for k in ("train_wall_s", "total_wall_s_incl_eval", "images_per_s_final", "knn")},
                     indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
