"""`dinolab eval` (frozen-feature classification) and `dinolab train` (DINOv2 pretraining)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dinolab.cli.common import (
    add_model_args,
    add_overwrite_arg,
    add_progress_arg,
    add_subset_args,
    check_out_dir,
    load_backbone,
    subset_test,
    subset_train,
)

log = logging.getLogger("dinolab")


def cmd_eval(args: argparse.Namespace) -> None:
    from dinolab.data.datasets import resolve_dataset
    from dinolab.distributed import get_rank, init_distributed
    from dinolab.eval import jobs

    init_distributed()  # under torchrun: feature extraction is sharded across ranks (kNN, logreg)
    out = check_out_dir(args.out or Path("runs") / f"eval-{args.task}-{Path(str(args.model)).stem}", args.overwrite)
    train = subset_train(resolve_dataset(args.train), args, f"--train {args.train}")
    test = subset_test(resolve_dataset(args.test), args, f"--test {args.test}")
    common = {"model_id": str(args.model), "out_dir": out}
    feat = {"resize": args.resize, "crop": args.crop, "batch_size": args.batch_size, "device": args.device,
            "num_workers": args.num_workers, "progress": not args.no_progress}
    if args.task == "knn":
        res = jobs.run_knn(load_backbone(args), train, test, ks=tuple(args.ks), temperature=args.temperature,
                           **feat, **common)
    elif args.task == "logreg":
        res = jobs.run_logreg(load_backbone(args), train, test, val_fraction=args.val_fraction, seed=args.seed,
                              **feat, **common)
    else:
        res = jobs.run_linear(load_backbone(args), train, test, epochs=args.epochs, augment=not args.no_augment,
                              val_fraction=args.val_fraction, seed=args.seed, **feat, **common)
    if get_rank() == 0:
        print(jobs.format_table(res))
        print(f"results: {out / 'results.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from dinolab.config import load_config
    from dinolab.train.loop import train

    cfg = load_config(args.config, args.overrides)
    res = train(cfg, args.data, device=args.device, progress=not args.no_progress, eval_train=args.eval_train,
                eval_test=args.eval_test, force=args.force)
    print(json.dumps(res, indent=1, default=str))


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="frozen-feature classification: knn, linear probe, logistic regression")
    esub = p.add_subparsers(dest="task", required=True, metavar="task")
    for task, text in (("knn", "DINOv2 kNN: cosine, top-k votes weighted by exp(sim/T)"),
                       ("linear", "DINOv2 linear probe grid (lr x last 1/4 blocks x CLS/+avgpool)"),
                       ("logreg", "multinomial logistic regression (L-BFGS), C chosen on held-out train")):
        e = esub.add_parser(task, help=text, description=text + ". Writes results.json, confusion_matrix.png "
                            "and per_class.json into --out and prints a table.")
        e.add_argument("--train", required=True, help="ImageFolder dir, .tar(.gz), labelled list file, or "
                       "cifar10:train")
        e.add_argument("--test", required=True, help="same forms as --train, e.g. cifar10:test")
        e.add_argument("--out", type=Path, help="run folder (default runs/eval-<task>-<model>)")
        e.add_argument("--resize", type=int, default=256, help="short side before the centre crop (256; "
                       "use 32 for CIFAR-size models)")
        e.add_argument("--crop", type=int, default=224, help="centre crop (224; 32 for CIFAR-size models)")
        e.add_argument("--batch-size", type=int, default=256)
        e.add_argument("--num-workers", type=int, default=0, help="decoding processes")
        if task == "knn":
            e.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
            e.add_argument("--temperature", type=float, default=0.07)
        else:
            e.add_argument("--val-fraction", type=float, default=0.1 if task == "linear" else 0.2,
                           help="part of train held out to choose the hyper-parameters")
        if task == "linear":
            e.add_argument("--epochs", type=int, default=10)
            e.add_argument("--no-augment", action="store_true", help="no random-resized-crop/flip: "
                           "backbone features are computed once and cached (fast)")
        add_subset_args(e, few_shot=True)
        add_progress_arg(e)
        add_overwrite_arg(e)
        add_model_args(e)
        e.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="self-supervised DINOv2 pretraining on unlabelled images",
                       description="Pretrain with the DINOv2 recipe (DINO + iBOT + KoLeo, multi-crop, EMA "
                       "teacher). Writes config.yaml, metrics.jsonl, checkpoints/, loss.png, results.json and "
                       "teacher_backbone.pth (official layout) into train.output_dir. Re-run the same command "
                       "to resume from the newest checkpoint.")
    p.add_argument("--config", default="cpu-smoke", help="preset (vits14, vitb14, vitl14, vitg14, vitl16_short, "
                   "cifar10, small-cpu, cpu-smoke) or a YAML file (may say `base: <preset>`)")
    p.add_argument("--data", required=True, help="a folder of images (recursive), a .txt list file, uncompressed .tar "
                   "shards (a shard or a folder of them), or cifar10:train")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 train.epochs=5")
    p.add_argument("--eval-train", help="labelled kNN bank for periodic evaluation, e.g. cifar10:train")
    p.add_argument("--eval-test", help="labelled kNN queries, e.g. cifar10:test (every train.eval_every its)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_progress_arg(p)
    p.add_argument("--force", action="store_true", help="resume even though the config or --data differ from the "
                   "checkpoint's (the changes are recorded in resumes.jsonl; without it they are refused)")
    p.set_defaults(func=cmd_train)
