"""Curation building blocks on real CIFAR-10 images: copy detection, retrieval-based selection, retrieval mAP.

Feature sources, each L2-normalised:
  backbone          CLS token of ``--backbone`` (default: the CPU-pretrained ViT-Ti/4, depth 6, of
                    benchmarks/pretrain_cifar10.py) at 32 px (resize 32, centre crop 32);
  backbone-centred  the same minus the mean CLS token of the train split (then normalised): this
                    backbone's CLS tokens share a large common direction (cosine ~0.99 between most
                    images), which ranks survive but absolute thresholds do not;
  pixels32          the image, each channel standardised (``dinolab.curate.copies.pixel_features``, size 32);
  pixels8           the same at 8 x 8 (area average): the copy descriptor of the dedup tests.
Backbone CLS tokens of the two splits are cached in ``--cache`` (git-ignored .bench_data/ by default).

1. Copy detection. Pool: ``--pool`` random test images; ``--copies`` of them get an edited copy
   (``augment_copy``): a fifth each with one edit (crop keeping 85-95% of the side, down/up-scale to
   50-80%, JPEG quality 20-60, colour shift) and a fifth with all four. ``find_duplicates`` at the lowest
   threshold gives candidate pairs; precision / recall of the planted pairs over a threshold sweep
   (P/R plot), at the best-F1 threshold (chosen on this same data: optimistic) and at fixed 0.90 / 0.95.
   Natural near-duplicates inside CIFAR-10 count as false positives, so precision is a lower bound.
2. Retrieval-based selection. Pool: ``--select-pool`` train images, balanced over the 10 classes;
   seeds: ``--seeds`` test images of 2 classes (airplane, automobile). Share of the selected pool
   images from the seed classes (base rate 20%) for sample-based (k = 1, 4, 16) and cluster-based
   (100 k-means clusters, k = 4, clusters kept with >= 1 or >= 3 seed-neighbour hits) selection.
3. Retrieval by class label: the 10,000 test images query the 50,000 train images (exact cosine).
   mAP over the full ranking, mAP@100 (truncated lists, ``mean_average_precision``), P@1 and P@10.

    python benchmarks/curate_cifar10.py [--backbone runs/pretrain_cifar10-cpu/teacher_backbone.pth]
           [--json benchmarks/results/curate_cifar10.json]

Data: ../shared/data/cifar10 (or $DINOLAB_CIFAR10), decoded once into the dinolab cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dinolab.curate.copies import augment_copy, pixel_features, precision_recall_sweep
from dinolab.curate.dedup import find_duplicates
from dinolab.curate.index import mean_average_precision
from dinolab.curate.selection import select_by_retrieval
from dinolab.data.datasets import load_cifar10
from dinolab.data.transforms import make_classification_transform
from dinolab.eval.features import extract_features
from dinolab.eval.neighbours import topk_cosine
from dinolab.io import atomic_save_figure, atomic_write, atomic_write_json
from dinolab.models.safe_load import safe_torch_load

EDITS = (("crop",), ("resize",), ("jpeg",), ("colour",), ("crop", "resize", "jpeg", "colour"))
SEED_CLASSES = (0, 1)  # airplane, automobile


class Features:
    """Unit-row features per source; backbone CLS tokens computed once (cached on disk) and centred on demand."""

    def __init__(self, model, backbone: str, batch_size: int, cache: Path, train) -> None:
        self.model, self.batch_size, self.mean, self.train = model, batch_size, None, train
        st = Path(backbone).stat() if model is not None else None
        self.cache = cache / f"cls-{Path(backbone).stem}-{st.st_size}-{int(st.st_mtime)}" if st else None

    def raw_cls(self, images: np.ndarray, name: str | None = None) -> torch.Tensor:
        path = self.cache / f"{name}.pt" if name and self.cache else None
        if path is not None and path.is_file():
            return safe_torch_load(path)
        f = extract_features(self.model, images, transform=make_classification_transform(32, 32),
                             batch_size=self.batch_size, device="cpu", progress=len(images) > 5000).cls
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda fh: torch.save(f, fh))
        return f

    def __call__(self, images: np.ndarray, source: str, name: str | None = None) -> torch.Tensor:
        """(N, D) unit rows of a uint8 array (N, 32, 32, 3); ``name`` keys the on-disk cache."""
        if source.startswith("backbone"):
            f = self.raw_cls(images, name)
            if source == "backbone-centred":
                if self.mean is None:  # the train split's mean CLS token
                    self.mean = self.raw_cls(np.asarray(self.train.items), "train").mean(0)
                f = f - self.mean
            return torch.nn.functional.normalize(f, dim=1)
        size = {"pixels32": 32, "pixels8": 8}[source]
        return torch.from_numpy(pixel_features(list(images), size=size))


def copy_detection(test, feats, featurize, args, rng) -> tuple[dict, dict]:
    pool_idx = np.sort(rng.choice(len(test), args.pool, replace=False))
    pool = np.asarray(test.items[pool_idx])
    src = rng.choice(args.pool, args.copies, replace=False)  # positions in the pool
    edit_of = np.arange(args.copies) % len(EDITS)
    copies = np.stack([np.asarray(augment_copy(pool[s], rng, EDITS[e])) for s, e in zip(src, edit_of)])
    planted = [(int(s), args.pool + j) for j, s in enumerate(src)]
    thresholds = np.round(np.arange(0.50, 1.0001, 0.01), 2)
    out, curves = {}, {}
    for source in args.sources:
        f = torch.cat([feats[source]["test"][pool_idx], featurize(copies, source)])
        t0 = time.perf_counter()
        res = find_duplicates(f, threshold=float(thresholds[0]), k=args.k)
        wall = time.perf_counter() - t0
        sweep = precision_recall_sweep(res.pairs, res.similarities, planted, thresholds)
        best = max(sweep, key=lambda r: (r["f1"], r["threshold"]))
        pair_sim = {tuple(p): s for p, s in zip(res.pairs.tolist(), res.similarities.tolist())}
        sims = np.array([pair_sim.get(p, -1.0) for p in planted])  # -1: not among the k neighbours
        per_edit = {"+".join(EDITS[e]): float((sims[edit_of == e] >= best["threshold"]).mean())
                    for e in range(len(EDITS))}
        at = {f"{t:.2f}": next(r for r in sweep if abs(r["threshold"] - t) < 1e-9) for t in (0.90, 0.95)}
        out[source] = {"best_f1": best, "recall_by_edit_at_best": per_edit, "fixed": at,
                       "planted_pair_similarity": {"median": float(np.median(sims)),
                                                   "p10": float(np.percentile(sims, 10))},
                       "dedup_wall_s": wall}
        curves[source] = sweep
        print(f"copy detection {source:16s} best F1 {best['f1']:.3f} at {best['threshold']:.2f} "
              f"(P {best['precision']:.3f} R {best['recall']:.3f}); recall by edit "
              + ", ".join(f"{k} {v:.2f}" for k, v in per_edit.items()), flush=True)
    return out, curves


def pr_plot(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    for source, sweep in curves.items():
        ax.plot([r["recall"] for r in sweep], [r["precision"] for r in sweep], marker=".", ms=3, label=source)
    ax.set_xlabel("recall (planted copies found)")
    ax.set_ylabel("precision (pairs found that are planted)")
    ax.set_title("CIFAR-10 copy detection, threshold sweep 0.50-1.00", fontsize=9)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def selection(train, test, feats, args, rng) -> dict:
    per = args.select_pool // 10
    pool_idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(train.labels == c), per, replace=False)
                                       for c in range(10)]))
    seed_idx = np.concatenate([rng.choice(np.flatnonzero(test.labels == c), args.seeds // 2, replace=False)
                               for c in SEED_CLASSES])
    y = train.labels[pool_idx]
    in_seed = np.isin(y, SEED_CLASSES)
    out = {"pool": int(pool_idx.size), "seeds": int(seed_idx.size), "seed_classes": [test.classes[c] for c in
                                                                                       SEED_CLASSES],
           "base_rate": float(in_seed.mean())}
    for source in args.sources:
        pool_f, seed_f = feats[source]["train"][pool_idx], feats[source]["test"][seed_idx]
        rows = {}
        for k in (1, 4, 16):
            sel = select_by_retrieval(pool_f, seed_f, mode="sample", k=k).selected
            rows[f"sample k={k}"] = {"selected": int(sel.size), "seed_class_share": float(in_seed[sel].mean())}
        for hits in (1, 3):
            sel = select_by_retrieval(pool_f, seed_f, mode="cluster", k=4, n_clusters=100, min_hits=hits, seed=0)
            rows[f"cluster 100, k=4, min_hits={hits}"] = {
                "selected": int(sel.selected.size), "clusters_kept": int(sel.clusters.size),
                "seed_class_share": float(in_seed[sel.selected].mean()) if sel.selected.size else float("nan")}
        out[source] = rows
        print(f"selection {source:16s} " + "; ".join(f"{k}: {v['selected']} imgs, {100 * v['seed_class_share']:.1f}% "
                                                     "seed classes" for k, v in rows.items()), flush=True)
    return out


def full_map(q: torch.Tensor, yq: np.ndarray, db: torch.Tensor, ydb: np.ndarray, chunk: int = 250) -> float:
    """Mean non-interpolated AP over the full ranking of ``db`` for every query (chunked)."""
    aps = []
    for s in range(0, q.shape[0], chunk):
        order = torch.argsort(q[s:s + chunk] @ db.T, dim=1, descending=True, stable=True).numpy()
        aps.append(mean_average_precision(order, yq[s:s + chunk], ydb, exclude_self=False) * order.shape[0])
    return float(sum(aps) / q.shape[0])


def retrieval(train, test, feats, args) -> dict:
    out = {"queries": "test (10,000)", "database": "train (50,000)", "relevance": "same class label"}
    ytr, yte = train.labels, test.labels
    for source in args.sources:
        db, q = feats[source]["train"], feats[source]["test"]
        t0 = time.perf_counter()
        _, top = topk_cosine(q, db, 100, normalized=True)
        top = top.numpy()
        rel = ytr[top] == yte[:, None]
        row = {"mAP": full_map(q, yte, db, ytr),
               "mAP@100": mean_average_precision(top, yte, ytr, exclude_self=False),
               "P@1": float(rel[:, 0].mean()), "P@10": float(rel[:, :10].mean()),
               "wall_s": time.perf_counter() - t0}
        out[source] = row
        print(f"retrieval {source:16s} mAP {100 * row['mAP']:.2f}  mAP@100 {100 * row['mAP@100']:.2f}  "
              f"P@1 {100 * row['P@1']:.2f}  P@10 {100 * row['P@10']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="runs/pretrain_cifar10-cpu/teacher_backbone.pth")
    ap.add_argument("--sources", nargs="+", default=["backbone", "backbone-centred", "pixels32", "pixels8"])
    ap.add_argument("--cache", type=Path, default=Path(".bench_data/curate_cifar10"),
                    help="where backbone CLS tokens of the two splits are kept between runs (git-ignored)")
    ap.add_argument("--pool", type=int, default=5000, help="copy detection: test images in the pool")
    ap.add_argument("--copies", type=int, default=500, help="copy detection: planted edited copies")
    ap.add_argument("--k", type=int, default=10, help="copy detection: neighbours searched per image")
    ap.add_argument("--select-pool", type=int, default=10_000, help="selection: train images (balanced)")
    ap.add_argument("--seeds", type=int, default=100, help="selection: test images of the 2 seed classes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "curate_cifar10.json")
    ap.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "curate_cifar10_pr.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dinolab.models import load_model

    model = load_model(args.backbone) if any(s.startswith("backbone") for s in args.sources) else None
    train, test = load_cifar10("train"), load_cifar10("test")
    featurize = Features(model, args.backbone, args.batch_size, args.cache, train)
    t0 = time.perf_counter()
    feats, embed_s = {}, {}
    for source in args.sources:  # every image of both splits once per source
        t = time.perf_counter()
        feats[source] = {split: featurize(np.asarray(ds.items), source, split)
                         for split, ds in (("train", train), ("test", test))}
        embed_s[source] = time.perf_counter() - t
        print(f"features {source}: {embed_s[source]:.0f} s for 60,000 images", flush=True)
    copy_res, curves = copy_detection(test, feats, featurize, args, np.random.default_rng(0))
    pr_plot(curves, args.plot)
    sel_res = selection(train, test, feats, args, np.random.default_rng(1))
    ret_res = retrieval(train, test, feats, args)
    result = {
        "benchmark": "curate_cifar10", "backbone": args.backbone, "sources": args.sources,
        "copy_detection": {"pool": args.pool, "copies": args.copies, "k": args.k,
                           "edits": ["+".join(e) for e in EDITS], **copy_res},
        "copy_detection_sweep": curves, "selection": sel_res, "retrieval": ret_res,
        "features_wall_s": embed_s, "wall_s": time.perf_counter() - t0, "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_end": os.getloadavg()},
        "command": "python " + " ".join(sys.argv),
    }
    atomic_write_json(args.json, result)
    print(f"wrote {args.json} and {args.plot} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
