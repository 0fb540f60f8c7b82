"""CamVid semantic segmentation with a linear head on frozen features: a checkpoint vs the same
architecture randomly initialised vs raw pixels, side by side in one run.

Each row trains the ``linear`` head (BatchNorm + 1x1 conv on the last block's patch tokens) on
cached features of the 367 training images (no augmentation) and reports mIoU, pixel accuracy and
mean class accuracy on the 233 validation images (SegNet's test split), one scale, whole image.

    python benchmarks/seg_camvid.py --backbone run/teacher_backbone.pth [--short-side 224] [--epochs 20]
    python benchmarks/seg_camvid.py --arch vit_small_patch14          # no checkpoint: the two floors only

Rows:
1. ``checkpoint``: ``dinolab.load_model(--backbone)`` (official .pth layout, e.g. a pretraining run's
   teacher_backbone.pth).
2. ``random-init``: the same architecture from ``create_model`` as is. Note: the official LayerScale
   init (1e-5) makes every block nearly the identity, so a random ViT's patch tokens are close to its
   LayerNorm'ed patch embeddings (a random linear projection of the pixels) plus position embeddings.
3. ``raw-pixels``: each 14 x 14 x 3 patch of the normalised image, flattened (588-d), through the
   same head and trainer (``dinolab.eval.segmentation.RawPixelBackbone``).

Data: ../shared/data/camvid (or $DINOLAB_CAMVID), extracted once into the dinolab cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dinolab.data.segmentation import load_camvid
from dinolab.eval.segmentation import RawPixelBackbone
from dinolab.eval.segmentation_jobs import TrainOptions, run_seg_train
from dinolab.models import create_model, load_model
from dinolab.models.checkpoints import _sidecar_variant, infer_variant, read_state_dict
from dinolab.models.vit import DinoVisionTransformer


def backbones(args: argparse.Namespace) -> list[tuple[str, str, torch.nn.Module]]:
    """(row name, description, model) for the three feature sources."""
    rows = []
    if args.backbone:
        ckpt = load_model(args.backbone)
        variant = _sidecar_variant(args.backbone) or infer_variant(read_state_dict(args.backbone))
        rows.append(("checkpoint", str(args.backbone), ckpt))
        torch.manual_seed(args.seed)
        rows.append(("random-init", f"{variant.name} (random init, LayerScale {variant.layerscale})",
                     DinoVisionTransformer(**variant.model_kwargs()).eval()))
        patch = ckpt.patch_size
    else:
        torch.manual_seed(args.seed)
        rows.append(("random-init", f"{args.arch} (create_model, LayerScale 1e-5)", create_model(args.arch).eval()))
        patch = rows[0][2].patch_size
    rows.append(("raw-pixels", f"{patch}x{patch}x3 patch pixels ({3 * patch * patch}-d)", RawPixelBackbone(patch)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, help="checkpoint (official .pth layout) for the first row")
    ap.add_argument("--arch", default="vit_small_patch14", help="architecture of the random-init row when no "
                    "--backbone is given (default %(default)s)")
    ap.add_argument("--short-side", type=int, default=224, help="resize so the short side is this, sides rounded "
                    "to patch multiples (320x240 -> 294x224, a 21x16 patch grid at patch 14)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--head", default="linear", choices=["linear", "linear4"])
    ap.add_argument("--train-limit", type=int, help="first N training images only (smoke runs)")
    ap.add_argument("--val-limit", type=int, help="first N validation images only (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "seg_camvid.json")
    args = ap.parse_args()

    train, val = load_camvid("train"), load_camvid("val")
    if args.train_limit:
        train = train.subset(range(min(args.train_limit, len(train))))
    if args.val_limit:
        val = val.subset(range(min(args.val_limit, len(val))))
    opts = TrainOptions(head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        short_side=args.short_side, seed=args.seed)
    rows = []
    for name, desc, model in backbones(args):
        if args.head == "linear4" and name == "raw-pixels":
            desc += ", the same map 4 times"
        t0 = time.perf_counter()
        res = run_seg_train(model, train, val, opts, model_id=desc, device=args.device, progress=True)
        rows.append({"backbone": name, "description": desc, "miou": res["miou"], "pixel_acc": res["pixel_acc"],
                     "macc": res["macc"], "per_class_iou": res["per_class_iou"], "epochs": res["epochs"],
                     "wall_s": {**res["wall_s"], "total": time.perf_counter() - t0}})
        print(f"{name:12s} mIoU {res['miou']:6.2f}  pixel acc {res['pixel_acc']:6.2f}  mAcc {res['macc']:6.2f}  "
              f"({rows[-1]['wall_s']['total']:.0f} s)", flush=True)

    print(f"\nCamVid val ({len(val)} images), linear head on frozen features, {args.epochs} epochs, short side "
          f"{args.short_side}, one scale")
    print(f"{'backbone':12s} {'mIoU':>6s} {'pixAcc':>7s} {'mAcc':>6s} {'feat s':>7s} {'train s':>8s} {'eval s':>7s}")
    for r in rows:
        w = r["wall_s"]
        print(f"{r['backbone']:12s} {r['miou']:6.2f} {r['pixel_acc']:7.2f} {r['macc']:6.2f} "
              f"{w['train_features'] + w['val_features']:7.1f} {w['train']:8.1f} {w['eval']:7.1f}")
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "train": len(train), "val": len(val), "options": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
