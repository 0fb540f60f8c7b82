"""Monocular depth on 7-Scenes RedKitchen: a ``lin1`` head on three frozen feature extractors.

Trains the DINOv2 ``lin1`` depth head (CLS + patch tokens of the last block, x4 bilinear, 256
uniform bins, SigLoss; tokens cached, no augmentation) on ``7scenes:train`` (40 frames) and
scores it on ``7scenes:val`` (10 frames), side by side in one run, for

1. ``pretrained``: the backbone at ``--backbone PATH`` (``dinolab.load_model``);
2. ``random_init``: the same architecture with random weights (``dinolab.create_model(arch)`` or,
   for a checkpoint of an own architecture, the same constructor arguments);
3. ``raw_patches``: the pixels of each 14x14 patch (3 x 14 x 14 = 588 values, ImageNet-normalised)
   as the "tokens", their mean as the "CLS" token — the floor any useful backbone must clear;

and, for scale, ``constant``: every pixel predicted at the median training depth (no image used).
One learning rate for all three (``--lr``, default 3e-3: the best of {3e-4, 1e-3, 3e-3, 1e-2} for
raw patches on val, 20 epochs; val is the only held-out set, so this is a mild val-tuned choice).

Caveat: 7-Scenes depth is **not registered** to RGB (the Kinect's depth and colour cameras were not
calibrated; offsets up to ~20 px at 320x240), and val is a later stretch of the same trajectory in the
same room. The numbers compare feature extractors under one protocol; they are not comparable with
NYU/KITTI results. ``--nyu`` also scores each head on the 3 NYU samples (10 m, Eigen crop) as a
units/crop smoke check (a head trained on 40 kitchen frames is not expected to do well there).

    python benchmarks/depth_7scenes.py --backbone runs/pretrain/teacher_backbone.pth --nyu
    python benchmarks/depth_7scenes.py --backbone x.pth --limit-train 8 --limit-val 4 --epochs 2   # smoke run

Writes ``benchmarks/results/depth_7scenes.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dinolab
from dinolab.data.depth import resolve_depth_dataset
from dinolab.eval.depth import evaluate_depth, train_depth_head
from dinolab.eval.metrics import depth_metrics, mean_depth_metrics
from dinolab.io import atomic_write_json
from dinolab.models.checkpoints import _sidecar_variant, infer_variant, read_state_dict
from dinolab.models.vit import DinoVisionTransformer

log = logging.getLogger("depth_7scenes")
CAVEAT = ("7-Scenes depth is not registered to RGB (offsets up to ~20 px at 320x240) and val is a later part of "
          "the same trajectory: compare the three extractors with each other, not with NYU/KITTI numbers.")


class RawPatchPixels(nn.Module):
    """Raw pixels of each patch as features, with the backbone interface the depth heads use.

    ``get_intermediate_layers`` returns one "block": patch tokens (B, 3 p^2, h, w) (the normalised
    pixels of each p x p patch, channel-major) and a "CLS" token = their mean over patches.
    """

    def __init__(self, patch_size: int = 14) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = 3 * patch_size * patch_size
        self.blocks = nn.ModuleList([nn.Identity()])  # one "layer"

    def get_intermediate_layers(self, x: Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        if (list(n) if not isinstance(n, int) else [0] if n == 1 else None) != [0]:
            raise ValueError(f"raw patches have a single layer (index 0), asked for {n}")
        B, _, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        patches = F.unfold(x, kernel_size=p, stride=p)  # (B, 3 p^2, h w)
        cls = patches.mean(dim=2)  # (B, 3 p^2)
        tokens = patches.reshape(B, -1, h, w) if reshape else patches.transpose(1, 2)
        return ((tokens, cls),) if return_class_token else (tokens,)


def random_like(path: str, arch: str | None) -> nn.Module:
    """Random weights, same architecture as the checkpoint (``arch`` when given)."""
    if arch:
        return dinolab.create_model(arch)
    p = Path(path)
    variant = _sidecar_variant(p) or infer_variant(read_state_dict(p))
    return DinoVisionTransformer(**variant.model_kwargs())


def constant_baseline(train, val) -> dict:
    """Predict the median valid training depth everywhere: the error of ignoring the image."""
    depths = np.concatenate([d[d > 0] for d in (train.load(i).depth for i in range(len(train)))])
    c = float(np.median(depths))
    per_image = [depth_metrics(np.full_like(s.depth, c), s.depth, min_depth=val.min_depth, max_depth=val.max_depth,
                               crop=val.crop) for s in (val.load(i) for i in range(len(val)))]
    m = mean_depth_metrics(per_image)
    return {"val": {k: m[k] for k in ("rmse", "abs_rel", "delta1")}, "val_all": m, "depth_m": c}


def run_one(name: str, model: nn.Module, train, val, nyu, args: argparse.Namespace) -> dict:
    log.info("== %s", name)
    t0 = time.perf_counter()
    res, head = train_depth_head(model, train, val, head="lin1", epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, short_side=args.short_side, seed=args.seed, device=args.device,
                                 progress=not args.no_progress, model_id=name)
    row = {"val": {k: res["val_metrics"][k] for k in ("rmse", "abs_rel", "delta1")},
           "val_all": res["val_metrics"], "final_train_loss": res["history"][-1]["loss"],
           "embed_dim": int(model.embed_dim), "wall_s": time.perf_counter() - t0}
    if nyu is not None:
        ev = evaluate_depth(model, head, nyu, short_side=args.short_side, device=args.device, progress=False)
        row["nyu_samples"] = {k: ev["metrics"][k] for k in ("rmse", "abs_rel", "delta1")}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", required=True, help="checkpoint path of the pretrained backbone")
    ap.add_argument("--arch", help="variant name of its architecture (default: inferred from the checkpoint)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--short-side", type=int, help="resize the 320x240 frames (default: native, padded)")
    ap.add_argument("--limit-train", type=int, help="use the first N training frames (smoke runs)")
    ap.add_argument("--limit-val", type=int, help="use the first N validation frames (smoke runs)")
    ap.add_argument("--nyu", action="store_true", help="also score each head on the 3 NYU samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "depth_7scenes.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    train, val = resolve_depth_dataset("7scenes:train"), resolve_depth_dataset("7scenes:val")
    if args.limit_train:
        train = train.subset(range(min(args.limit_train, len(train))))
    if args.limit_val:
        val = val.subset(range(min(args.limit_val, len(val))))
    nyu = resolve_depth_dataset("nyu-samples") if args.nyu else None
    pretrained = dinolab.load_model(args.backbone, arch=args.arch)
    torch.manual_seed(args.seed)
    extractors = {"pretrained": pretrained, "random_init": random_like(args.backbone, args.arch).eval(),
                  "raw_patches": RawPatchPixels(pretrained.patch_size)}
    results = {name: run_one(name, m, train, val, nyu, args) for name, m in extractors.items()}
    results["constant"] = constant_baseline(train, val)

    report = {"benchmark": "depth_7scenes", "head": "lin1 (cached tokens, SigLoss, 256 uniform bins, 0.001-10 m)",
              "backbone": args.backbone, "caveat": CAVEAT,
              "setting": {"train": len(train), "val": len(val), "epochs": args.epochs, "batch_size": args.batch_size,
                          "lr": args.lr, "short_side": args.short_side, "seed": args.seed},
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          "threads": torch.get_num_threads()},
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "results": results}
    atomic_write_json(args.out, report)
    print(f"{'extractor':12s} {'dim':>5s} {'rmse (m)':>9s} {'abs_rel':>8s} {'delta1':>7s}"
          + ("  nyu rmse" if args.nyu else ""))
    for name, r in results.items():
        v = r["val"]
        print(f"{name:12s} {r.get('embed_dim', 0):5d} {v['rmse']:9.3f} {v['abs_rel']:8.3f} {v['delta1']:7.3f}"
              + (f"  {r['nyu_samples']['rmse']:8.3f}" if "nyu_samples" in r else ""))
    print(f"wrote {args.out}\n{json.dumps(CAVEAT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
