"""Floors every pretrained model must clear on CIFAR-10: raw pixels and a random-init ViT-S/4.

For each feature source: kNN (DINOv2 protocol, k = 10/20/100/200, T = 0.07) and the linear-probe
grid on cached features (no augmentation; held-out and official selection), with wall times.

    python benchmarks/cifar10_baselines.py [--train-limit N] [--json benchmarks/results/cifar10_baselines.json]

Data: ../shared/data/cifar10 (or $DINOLAB_CIFAR10), decoded once into the dinolab cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dinolab.data.datasets import few_shot, load_cifar10, stratified_split
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinolab.eval.knn import knn_classify
from dinolab.eval.linear import extract_linear_features, linear_probe_features
from dinolab.models import create_model


def raw_pixels(ds) -> dict[str, torch.Tensor]:
    """Normalised pixels as one 3072-dim 'CLS block': {"cls": (N, 1, 3072)}."""
    x = torch.from_numpy(np.array(ds.items)).float().div(255)  # (N, 32, 32, 3), copied out of the memmap
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return {"cls": x.flatten(1).unsqueeze(1)}


def evaluate(name: str, feats: dict, classes: list[str], n_blocks, avgpool, epochs: int) -> dict:
    """kNN on the last CLS block and the linear grid, on cached (fit, val, test) features."""
    (fit_f, fit_y), (val_f, val_y), (test_f, test_y) = feats["fit"], feats["val"], feats["test"]
    t0 = time.perf_counter()
    bank = torch.cat([fit_f["cls"][:, -1], val_f["cls"][:, -1]])  # kNN uses the whole train split
    knn = knn_classify(bank, torch.cat([fit_y, val_y]), test_f["cls"][:, -1], test_labels=test_y,
                       num_classes=len(classes))
    t1 = time.perf_counter()
    lin = linear_probe_features((fit_f, fit_y), (val_f, val_y), (test_f, test_y), classes=classes,
                                n_blocks=n_blocks, avgpool=avgpool, epochs=epochs, batch_size=256, progress=False)
    t2 = time.perf_counter()
    row = {"features": name, "knn_top1": knn.top1, "knn_top5": knn.top5, "linear_held_out": lin.held_out,
           "linear_official": lin.official, "wall_s": {"knn": t1 - t0, "linear": t2 - t1}}
    print(f"{name:22s} kNN k=20 {knn.top1[20]:6.2f}  linear held-out {lin.held_out['test_top1']:6.2f} "
          f"official {lin.official['test_top1']:6.2f}  (kNN {t1 - t0:.0f}s, linear {t2 - t1:.0f}s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-limit", type=int, default=None, help="images per class from train (default all 5000)")
    ap.add_argument("--epochs", type=int, default=10, help="linear-probe epochs over the cached features")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "cifar10_baselines.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    train, test = load_cifar10("train"), load_cifar10("test")
    if args.train_limit:
        train = few_shot(train, args.train_limit, seed=0)
    fit, val = stratified_split(train, 0.1, seed=0)
    rows, walls = [], {}

    t0 = time.perf_counter()
    feats = {k: (raw_pixels(ds), torch.as_tensor(ds.labels)) for k, ds in (("fit", fit), ("val", val), ("test", test))}
    walls["raw_pixels_features"] = time.perf_counter() - t0
    rows.append(evaluate("raw pixels (3072-d)", feats, train.classes, (1,), (False,), args.epochs))

    model = create_model("vit_small_patch4", img_size=32).eval()  # random init, the official init scheme
    t0 = time.perf_counter()
    feats = {}
    for k, ds in (("fit", fit), ("val", val), ("test", test)):
        f, y, _ = extract_linear_features(model, ds, n_blocks=4, resize=32, crop=32, batch_size=args.batch_size,
                                          device="cpu")
        feats[k] = (f, y)
    walls["vit_s4_features"] = time.perf_counter() - t0
    print(f"random-init ViT-S/4 features of {len(train) + len(test)} images: {walls['vit_s4_features']:.0f}s", flush=True)
    rows.append(evaluate("random-init ViT-S/4", feats, train.classes, (1, 4), (False, True), args.epochs))

    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "train": len(train), "fit": len(fit), "val": len(val), "test": len(test),
            "epochs": args.epochs, "wall_s": walls}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
