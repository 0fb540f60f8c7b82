"""``dinolab`` command line: one thin subcommand per job, each calling one library function.

Errors meant for the user (missing weights, bad input folders ...) end the command with one line
on stderr and exit code 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from dinolab.errors import DinolabError

log = logging.getLogger("dinolab")


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "dinov2_vits14") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help="variant name (see `dinolab models`), or a checkpoint "
                   "path (.pth/.safetensors, official/HF/timm layout) or HF folder (default: %(default)s)")
    g.add_argument("--weights", type=Path, help="weights file for a named variant, instead of the cached "
                   "or downloaded official file")
    g.add_argument("--arch", help="variant whose architecture a checkpoint path has (default: inferred)")
    g.add_argument("--sha256", help="expected SHA-256 of the weights file")
    g.add_argument("--random-init", action="store_true", help="random weights for a named variant (smoke tests)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _load(args: argparse.Namespace):
    from dinolab.models import load_model

    if args.model is None:
        raise DinolabError("pass --model NAME_OR_PATH")
    return load_model(args.model, weights=args.weights, arch=args.arch, sha256=args.sha256,
                      pretrained=not args.random_init)


def cmd_models(args: argparse.Namespace) -> None:
    from dinolab.models.checkpoints import cache_dir
    from dinolab.models.variants import VARIANTS

    print(f"{'name':28s} {'dim':>5s} {'depth':>5s} {'patch':>5s} {'regs':>4s}  weights / aliases")
    for v in VARIANTS.values():
        if args.official and not v.url:
            continue
        cached = v.filename and (cache_dir() / v.filename).exists()
        where = ("cached" if cached else "download on first use") if v.url else "train your own"
        alias = f"  (= {', '.join(v.aliases)})" if v.aliases else ""
        print(f"{v.name:28s} {v.embed_dim:5d} {v.depth:5d} {v.patch_size:5d} {v.num_register_tokens:4d}  {where}{alias}")


def cmd_download(args: argparse.Namespace) -> None:
    from dinolab.models import get_variant
    from dinolab.models.checkpoints import resolve_weights

    for name in args.names:
        print(resolve_weights(get_variant(name), sha256=args.sha256))


def cmd_embed(args: argparse.Namespace) -> None:
    from dinolab.curate.embed import embed
    from dinolab.data.transforms import make_classification_transform
    from dinolab.distributed import get_rank, init_distributed

    init_distributed()  # under torchrun: the shards are dealt to the ranks, rank 0 merges
    autocast = {"auto": None, "fp32": False, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = args.images[0] if len(args.images) == 1 else args.images  # one folder / list file, or files
    res = embed(_load(args), images, args.out, model_id=str(args.model),
                transform=make_classification_transform(args.resize, args.crop), batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, autocast=autocast,
                pooling=args.pooling.split(","), fmt=args.format, shard_size=args.shard_size,
                overwrite=args.overwrite, progress=not args.no_progress)
    if get_rank() == 0:
        print(f"embedded {res.count} images into {res.out_dir} ({len(res.skipped)} skipped, listed in skipped.txt)")


def cmd_pca(args: argparse.Namespace) -> None:
    from dinolab.viz.pca import pca_figure, sample_images

    images = args.images or sample_images(args.samples.split(",") if args.samples else None)
    out = pca_figure(_load(args), images, args.out, short_side=args.short_side, threshold=args.threshold,
                     foreground=args.foreground, show_mask=not args.no_mask,
                     device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"wrote {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from dinolab.models.checkpoints import save_hf_folder, save_official

    model = _load(args)
    out = save_hf_folder(model, args.out) if args.to == "hf" else save_official(model, args.out)
    print(f"wrote {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dinolab.data.datasets import few_shot, resolve_dataset
    from dinolab.distributed import get_rank, init_distributed
    from dinolab.eval import jobs

    init_distributed()  # under torchrun: feature extraction is sharded across ranks (kNN, logreg)
    train, test = resolve_dataset(args.train), resolve_dataset(args.test)
    if args.few_shot:
        train = few_shot(train, args.few_shot, seed=args.seed)
    out = args.out or Path("runs") / f"eval-{args.task}-{Path(str(args.model)).stem}"
    common = {"model_id": str(args.model), "out_dir": out}
    feat = {"resize": args.resize, "crop": args.crop, "batch_size": args.batch_size, "device": args.device,
                "num_workers": args.num_workers}
    if args.task == "knn":
        res = jobs.run_knn(_load(args), train, test, ks=tuple(args.ks), temperature=args.temperature,
                           **feat, **common)
    elif args.task == "logreg":
        res = jobs.run_logreg(_load(args), train, test, val_fraction=args.val_fraction, seed=args.seed,
                              **feat, **common)
    else:
        res = jobs.run_linear(_load(args), train, test, epochs=args.epochs, augment=not args.no_augment,
                              val_fraction=args.val_fraction, seed=args.seed, **feat, **common)
    if get_rank() == 0:
        print(jobs.format_table(res))
        print(f"results: {out / 'results.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from dinolab.config import load_config
    from dinolab.train.loop import train

    cfg = load_config(args.config, args.overrides)
    res = train(cfg, args.data, device=args.device, progress=not args.no_progress, eval_train=args.eval_train,
                eval_test=args.eval_test)
    print(json.dumps(res, indent=1, default=str))


def cmd_index(args: argparse.Namespace) -> None:
    from dinolab.curate import retrieval
    from dinolab.curate.index import load_index

    if args.action == "build":
        kw = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe), ("hnsw_m", args.hnsw_m),
                                ("ef_search", args.ef_search), ("pq_m", args.pq_m)) if v is not None}
        index = retrieval.build_index(args.embeddings, args.out, key=args.key, kind=args.kind, **kw)
        print(f"indexed {len(index)} images into {args.out} ({index.kind})")
        return
    if args.action == "revisited":
        from dinolab.curate.revisited import SETTINGS, evaluate_revisited
        from dinolab.io import atomic_write_json

        res = evaluate_revisited(_load(args), args.root, args.dataset, resize=args.resize,
                                 crop=args.crop or None, batch_size=args.batch_size, device=args.device,
                                 num_workers=args.num_workers, progress=not args.no_progress)
        res["model"] = str(args.model)
        out = args.out or Path("runs") / f"revisited-{args.dataset}-{Path(str(args.model)).stem}"
        atomic_write_json(Path(out) / "results.json", res)
        for s in SETTINGS:
            print(f"{args.dataset} {s:6s} mAP {100 * res[s]['mAP']:6.2f}  mP@10 {100 * res[s]['mP@10']:6.2f}")
        print(f"results: {Path(out) / 'results.json'}")
        return
    index = load_index(args.index)
    images = [*args.image]
    for source in args.images or []:
        from dinolab.data.images import list_images

        images += list_images(source)
    model = None
    if images:
        if args.model and index.model_id and str(args.model) != index.model_id:
            log.warning("index built with %s, queries embedded with %s", index.model_id, args.model)
        args.model = args.model or index.model_id or None
        model = _load(args)
    search_kw = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    if search_kw and index.kind == "exact":
        raise DinolabError("--nprobe / --ef-search apply to faiss indexes; this index is exact")
    results = retrieval.search(index, k=args.k, model=model, images=images, ids=args.id, device=args.device,
                               resize=args.resize, crop=args.crop, **search_kw)
    retrieval.save_results(results, args.out)
    if args.sheet:
        retrieval.contact_sheet(results, args.images_root or index.info.get("id_root"), args.sheet)
    print(json.dumps(results[:3], indent=1) + (f"\n... ({len(results)} queries)" if len(results) > 3 else ""))
    print(f"results: {args.out}" + (f", sheet: {args.sheet}" if args.sheet else ""))


def _add_index_parser(sub) -> None:
    """``dinolab index build | search | revisited``."""
    p = sub.add_parser("index", help="image retrieval: exact or faiss index over `dinolab embed` features",
                       description="Build an index over a finished `dinolab embed` folder (exact torch search, or "
                       "faiss flat / IVF / HNSW / IVF-PQ), search it by image files or indexed ids, or score a "
                       "backbone on revisited Oxford / Paris.")
    isub = p.add_subparsers(dest="action", required=True, metavar="action")
    b = isub.add_parser("build", help="index the features of a finished `dinolab embed` folder")
    b.add_argument("--embeddings", type=Path, required=True, help="output folder of dinolab embed")
    b.add_argument("--out", type=Path, required=True, help="index folder to write")
    b.add_argument("--key", default="cls", help="which features: cls (default) or patch_mean")
    b.add_argument("--kind", default="auto", choices=["auto", "exact", "flat", "ivf", "hnsw", "ivfpq"],
                   help="auto: exact up to 1M images, IVF up to 20M, IVF-PQ beyond; flat/ivf/hnsw/ivfpq need faiss")
    b.add_argument("--nlist", type=int, help="IVF cells (default: power of 2 near 4 sqrt(N))")
    b.add_argument("--nprobe", type=int, help="IVF cells searched per query, stored as the default (32)")
    b.add_argument("--hnsw-m", type=int, help="HNSW links per node (32)")
    b.add_argument("--ef-search", type=int, help="HNSW candidates per query, stored as the default (128)")
    b.add_argument("--pq-m", type=int, help="PQ bytes per vector (default: largest divisor of D <= D/4)")
    b.set_defaults(func=cmd_index)
    q = isub.add_parser("search", help="nearest indexed images of query images (--image/--images) or ids (--id)")
    q.add_argument("--index", type=Path, required=True)
    q.add_argument("--image", nargs="*", default=[], help="query image files (embedded with --model, by default "
                   "the model the index was built with)")
    q.add_argument("--images", nargs="*", help="a batch of queries: folders or .txt list files of images")
    q.add_argument("--id", nargs="*", default=[], help="ids already in the index (the id itself is excluded)")
    q.add_argument("-k", type=int, default=10, help="neighbours per query")
    q.add_argument("--nprobe", type=int, help="faiss IVF: cells searched (default: the index's)")
    q.add_argument("--ef-search", type=int, help="faiss HNSW: candidates per query (default: the index's)")
    q.add_argument("--resize", type=int, help="query transform short side (default: what the index was embedded with)")
    q.add_argument("--crop", type=int, help="query transform centre crop (default: as embedded)")
    q.add_argument("--out", type=Path, default=Path("search.json"), help="results JSON (default search.json)")
    q.add_argument("--sheet", type=Path, help="also write a contact-sheet PNG (query + neighbours)")
    q.add_argument("--images-root", type=Path, help="folder the indexed ids are relative to (for --sheet; default: "
                   "recorded by dinolab embed)")
    _add_model_args(q, default=None)
    q.set_defaults(func=cmd_index)
    r = isub.add_parser("revisited", help="revisited Oxford / Paris mAP (easy, medium, hard)",
                        description="Radenovic et al. 2018 protocol: embeds the database and the query regions "
                        "(cropped by bbx) and reports mAP and mP@1/5/10 in the easy, medium and hard settings. "
                        "--root holds gnd_<dataset>.pkl and jpg/ (or <dataset>/ or datasets/<dataset>/ with them).")
    r.add_argument("--root", type=Path, required=True, help="folder with gnd_<dataset>.pkl and jpg/")
    r.add_argument("--dataset", default="roxford5k", choices=["roxford5k", "rparis6k"])
    r.add_argument("--resize", type=int, default=224, help="short side of the images (default 224)")
    r.add_argument("--crop", type=int, default=0, help="centre crop; 0 (default) keeps the whole image, sides "
                   "rounded to the patch size, one image per batch")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--out", type=Path, help="run folder (default runs/revisited-<dataset>-<model>)")
    r.add_argument("--no-progress", action="store_true")
    _add_model_args(r)
    r.set_defaults(func=cmd_index)


def cmd_curate(args: argparse.Namespace) -> None:
    from dinolab.curate.config import load_curate_config
    from dinolab.curate.pipeline import run_pipeline, run_stage
    from dinolab.distributed import init_distributed

    flags = {"out": args.out, "embeddings": args.embeddings, "images_root": args.images_root, "seed": args.seed,
             "device": args.device, "select.seeds": args.seeds, "sample.n": args.n,
             "images": getattr(args, "images", None)}
    cfg = load_curate_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
    progress = not args.no_progress
    if args.stage == "run":
        init_distributed()  # under torchrun: the embedding is sharded; the stages run on rank 0
        need_model = cfg.images and not cfg.embeddings
        summary = run_pipeline(cfg, model=_load(args) if need_model else None, model_id=str(args.model),
                               progress=progress)
    else:
        summary = run_stage(args.stage, cfg, input_manifest=args.input, progress=progress)
    if not summary:
        return  # a rank other than 0
    for s in summary["stages"]:
        print(f"{s['stage']:8s} {s['n_in']:>9d} -> {s['n_out']:>9d}  ({s['removed']} removed, {s['wall_s']:.1f} s"
              + (", reused" if s.get("reused") else "") + ("" if s["this_run"] else ", earlier run") + ")")
    if summary["final"]:
        print(f"manifest: {summary['final']['manifest']} ({summary['final']['images']} images)")
    print(f"report: {Path(cfg.out) / 'report.md'}")


def _add_curate_parser(sub) -> None:
    """``dinolab curate dedup | select | cluster | sample | run``."""
    p = sub.add_parser("curate", help="data curation: dedup, retrieval-based selection, k-means, balanced sampling",
                       description="Curate an embedded image pool (`dinolab embed`). Each stage writes "
                       "<out>/<stage>/manifest.txt (one image path a line; `dinolab train --data` reads it) and a "
                       "report; `run` chains embed -> dedup -> select -> cluster -> sample from a YAML (--config) "
                       "and flags, and re-uses stages whose inputs did not change.")
    csub = p.add_subparsers(dest="stage", required=True, metavar="stage")
    helps = {"dedup": "remove near-duplicates (cosine >= threshold, connected components) and near-copies of "
                      "evaluation sets",
             "select": "keep pool images retrieved by seed images (k nearest per seed, or k-means clusters they hit)",
             "cluster": "hierarchical k-means of the pool (cluster sizes plot, tree for sampling)",
             "sample": "balanced sampling of --n images over the cluster tree (flattens long tails)",
             "run": "the whole chain from a YAML (--config) and flags"}
    for stage, text in helps.items():
        c = csub.add_parser(stage, help=text, description=text + ". Options not given as flags come from --config "
                            "and section.key=value overrides (keys: see src/dinolab/configs/curate/default.yaml).")
        c.add_argument("overrides", nargs="*", help="section.key=value, e.g. dedup.threshold=0.9 cluster.ks=[100,10]")
        c.add_argument("--config", help="YAML file or preset name (default: the defaults)")
        c.add_argument("--out", help="run folder (default runs/curate)")
        c.add_argument("--embeddings", help="the pool: a finished `dinolab embed` folder")
        c.add_argument("--images-root", help="folder the pool ids are relative to (default: recorded by embed)")
        c.add_argument("--seeds", help="embed folder of seed images (select)")
        c.add_argument("--n", type=int, help="images to keep (sample)")
        c.add_argument("--seed", type=int, help="random seed (default 0)")
        c.add_argument("--no-progress", action="store_true")
        if stage == "run":
            c.add_argument("--images", help="images to embed first (folder or .txt list) instead of --embeddings")
            _add_model_args(c)
        else:
            c.add_argument("--input", help="manifest of the images to start from (default: the previous finished "
                           "stage in --out, else the whole pool)")
            c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        c.set_defaults(func=cmd_curate)


def _seg_dataset(spec: str, args: argparse.Namespace):
    from dinolab.data.segmentation import parse_classes, resolve_segmentation_dataset

    opts = {k: v for k, v in (("images_dir", args.images_dir), ("masks_dir", args.masks_dir),
                              ("split_file", args.split_file), ("num_classes", args.num_classes),
                              ("ignore_index", args.ignore_index),
                              ("reduce_zero_label", True if args.reduce_zero_label else None)) if v is not None}
    return resolve_segmentation_dataset(spec, root=args.data_root, **{**parse_classes(args.classes), **opts})


def _seg_inference(args: argparse.Namespace, default):
    from dataclasses import replace

    from dinolab.eval.segmentation import MS_SCALES

    inf = replace(default, **{k: v for k, v in (("mode", args.mode), ("crop", args.crop), ("stride", args.stride))
                              if v is not None})
    if args.ms:
        inf = replace(inf, scales=MS_SCALES, flip=True)
    if args.scales:
        inf = replace(inf, scales=tuple(args.scales))
    return replace(inf, flip=inf.flip if args.flip is None else args.flip)


def cmd_seg(args: argparse.Namespace) -> None:
    from dinolab.eval import segmentation_jobs as seg
    from dinolab.eval.segmentation import Inference, read_seg_head

    progress = not args.no_progress
    if args.action == "train":
        train = _seg_dataset(args.train, args)
        val = _seg_dataset(args.val, args) if args.val else None
        opts = seg.TrainOptions(head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, short_side=args.short_side or 448,
                                round_to_patch=not args.no_round, augment=args.augment, crop=args.train_crop,
                                class_weights=args.class_weights, seed=args.seed, num_workers=args.num_workers,
                                cache_dtype=args.cache_dtype)
        out = args.out or Path("runs") / f"seg-{args.head}-{Path(str(args.model)).stem}"
        res = seg.run_seg_train(_load(args), train, val, opts, inference=_seg_inference(args, Inference()),
                                model_id=str(args.model), out_dir=out, device=args.device, progress=progress)
        print(seg.format_table(res))
        print(f"head: {out / 'head.pth'}  results: {out / 'results.json'}")
        return
    ckpt = read_seg_head(args.head, sha256=args.head_sha256)
    args.model = args.model or ckpt.settings.get("model")
    inference = _seg_inference(args, ckpt.inference)
    short = args.short_side or ckpt.settings.get("short_side")
    rounded = ckpt.settings.get("round_to_patch", True) and not args.no_round
    if args.action == "eval":
        out = args.out or Path("runs") / f"seg-eval-{Path(str(args.head)).stem}"
        res = seg.run_seg_eval(_load(args), ckpt, _seg_dataset(args.data, args), inference=inference,
                               short_side=short, round_to_patch=rounded, model_id=str(args.model), out_dir=out,
                               device=args.device, progress=progress)
        print(seg.format_table(res))
        print(f"results: {out / 'results.json'}")
    else:
        images = args.images[0] if len(args.images) == 1 else args.images
        recs = seg.run_seg_predict(_load(args), ckpt, images, args.out, inference=inference, short_side=short,
                                   round_to_patch=rounded, alpha=args.alpha, device=args.device, progress=progress)
        done = sum("overlay" in r for r in recs)
        print(f"wrote {done} overlays to {args.out} ({len(recs) - done} skipped); see predictions.json")


def _add_seg_parser(sub) -> None:
    """``dinolab seg train | eval | predict``."""
    p = sub.add_parser("seg", help="semantic segmentation: linear heads on frozen patch features",
                       description="Train (train), score (eval) and apply (predict) linear segmentation heads on "
                       "frozen backbone features, the DINOv2 protocol. Heads: our run folders / head.pth files or "
                       "the official ones by name (dinov2_vits14_ade20k_linear, ..._voc2012_ms, ...).")
    ssub = p.add_subparsers(dest="action", required=True, metavar="action")
    t = ssub.add_parser("train", help="train a linear / linear4 head; writes head.pth, results.json, metrics.jsonl")
    t.add_argument("--train", required=True, help="camvid:train, ade20k:train, voc2012:train, or a folder / .tar.gz "
                   "with images/ + masks/")
    t.add_argument("--val", help="evaluation split (same forms); without it the scores are on --train")
    t.add_argument("--head", default="linear", choices=["linear", "linear4"], help="last block (linear) or last 4 "
                   "blocks concatenated (linear4, the +ms head)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (official 1e-3)")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--augment", action="store_true", help="random rescale/crop/flip, backbone every step (slow); "
                   "default: backbone features computed once and cached")
    t.add_argument("--train-crop", type=int, help="crop side with --augment (default: the short side)")
    t.add_argument("--class-weights", help="loss weights: 'median-freq' or one comma-separated value per class")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-workers", type=int, default=0, help="decoding processes with --augment")
    t.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage of cached features (float16 halves the memory)")
    t.add_argument("--out", type=Path, help="run folder (default runs/seg-<head>-<model>)")
    e = ssub.add_parser("eval", help="mIoU / per-class IoU / pixel accuracy of a head on a split")
    e.add_argument("--head", required=True, help="run folder, head.pth, or an official head name")
    e.add_argument("--data", required=True, help="camvid:val, ade20k:val, voc2012:val, or a folder / .tar.gz")
    e.add_argument("--out", type=Path, help="run folder (default runs/seg-eval-<head>)")
    r = ssub.add_parser("predict", help="colour-overlay PNGs with a legend, and index masks")
    r.add_argument("images", nargs="+", help="a folder, a .txt list file, or image files")
    r.add_argument("--head", required=True, help="run folder, head.pth, or an official head name")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay")
    for q in (t, e, r):
        g = q.add_argument_group("preprocessing and inference (eval/predict default: what the head was made with)")
        g.add_argument("--short-side", type=int, help="resize images so the short side is this (train default 448)")
        g.add_argument("--no-round", action="store_true", help="keep the exact resized size (the model pads to the "
                       "patch size) instead of rounding the sides to patch multiples")
        g.add_argument("--mode", choices=["whole", "slide"], help="whole image, or sliding windows")
        g.add_argument("--crop", type=int, help="sliding-window side (px)")
        g.add_argument("--stride", type=int, help="sliding-window step (px)")
        g.add_argument("--scales", type=float, nargs="+", help="test-time scale ratios, e.g. 1.0 1.32 1.73")
        g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="horizontal-flip TTA")
        g.add_argument("--ms", action="store_true", help="the official +ms test: scales 1.0 1.32 1.73 2.28 3.0 + flip")
        g.add_argument("--no-progress", action="store_true")
        if q is not r:
            d = q.add_argument_group("dataset options (folders; named datasets fix their own)")
            d.add_argument("--classes", help="class names: comma list, .txt (one per line) or .json (classes, "
                           "palette, mask_format index|rgb, ignore_colors)")
            d.add_argument("--num-classes", type=int, help="number of classes (default: from names or masks)")
            d.add_argument("--ignore-index", type=int, help="mask value of unlabelled pixels (default 255)")
            d.add_argument("--reduce-zero-label", action="store_true", help="0 = unlabelled, classes 1..C (ADE20K)")
            d.add_argument("--images-dir", help="images folder under the root (default images)")
            d.add_argument("--masks-dir", help="masks folder under the root (default masks)")
            d.add_argument("--split-file", help="ids to use, one per line, relative to the root (VOC ImageSets)")
            d.add_argument("--data-root", help="folder of a named dataset (camvid, ade20k, voc2012)")
        if q is not t:
            q.add_argument("--head-sha256", help="expected SHA-256 of the head file")
        _add_model_args(q, default="dinov2_vits14" if q is t else None)
        q.set_defaults(func=cmd_seg)


def _depth_dataset(spec: str, args: argparse.Namespace):
    from dinolab.data.depth import resolve_depth_dataset

    crop = False if args.crop is None else (None if args.crop == "none" else args.crop)
    return resolve_depth_dataset(spec, root=args.data_root, min_depth=args.min_depth, max_depth=args.max_depth,
                                 crop=crop, png_scale=args.png_scale)


def _depth_head(args: argparse.Namespace):
    """(backbone, loaded head) for eval/predict; --model defaults to the head's backbone."""
    from dinolab.eval.depth import check_backbone
    from dinolab.eval.depth_heads import load_depth_head, parse_official_name

    source = Path(args.head) / "head.pth" if Path(args.head).is_dir() else args.head
    official = parse_official_name(source)
    args.model = args.model or (official.backbone if official else None)
    model = _load(args) if args.model else None
    loaded = load_depth_head(source, embed_dim=model.embed_dim if model else None,
                             depth=len(model.blocks) if model else None, max_depth=args.head_max_depth,
                             sha256=args.head_sha256)
    if model is None:
        args.model = loaded.backbone
        model = _load(args)  # raises "pass --model" when the head does not name its backbone
    check_backbone(model, loaded.config)
    return model, loaded


def cmd_depth(args: argparse.Namespace) -> None:
    from dinolab.eval import depth

    progress = not args.no_progress
    common = {"short_side": args.short_side, "unpad": args.unpad, "device": args.device, "progress": progress}
    if args.action == "train":
        train = _depth_dataset(args.train, args)
        val = _depth_dataset(args.val, args) if args.val else None
        out = args.out or Path("runs") / f"depth-{args.head}-{Path(str(args.model)).stem}"
        settings = {"n_bins": args.n_bins, "bins": args.bins, "norm_strategy": args.norm_strategy,
                    "final_norm": args.final_norm}
        if args.head == "dpt":
            settings = {"channels": args.dpt_channels, "final_norm": args.final_norm}
        res, _ = depth.train_depth_head(
            _load(args), train, val, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, grad_loss=args.grad_loss, augment=args.augment,
            crop_fraction=args.crop_fraction, seed=args.seed, out_dir=out, save_png=args.save_png,
            model_id=str(args.model), **common, **settings)
        print(depth.format_depth_table(res))
        print(f"head: {out / 'head.pth'}  results: {out / 'results.json'}")
        return
    model, loaded = _depth_head(args)
    if args.action == "eval":
        out = args.out or Path("runs") / f"depth-eval-{Path(str(args.head)).stem}"
        res = depth.evaluate_depth(model, loaded, _depth_dataset(args.data, args), flip_tta=args.flip_tta,
                                   out_dir=out, save_png=args.save_png, model_id=str(args.model),
                                   head_id=str(args.head), **common)
        print(depth.format_depth_table(res))
        print(f"results: {out / 'results.json'}")
    else:
        from dinolab.data.images import list_images

        images = [p for src in args.images for p in list_images(src)]
        rows = depth.predict_images(model, loaded, images, args.out, flip_tta=args.flip_tta, **common)
        print(f"wrote {len(rows)} depth maps (PNG + float32 metres .npy) to {args.out}")


def _add_depth_parser(sub) -> None:
    """``dinolab depth train | eval | predict``."""
    p = sub.add_parser("depth", help="monocular depth: linear / DPT heads on frozen features",
                       description="Train (train), score (eval) and apply (predict) depth heads on frozen backbone "
                       "features, the DINOv2 protocol: lin1 / lin4 (256-bin classification) or DPT. Heads: run "
                       "folders, head.pth files, or the official ones by name (dinov2_vits14_nyu_linear4, "
                       "dinov2_vitb14_kitti_dpt, ...).")
    dsub = p.add_subparsers(dest="action", required=True, metavar="action")
    t = dsub.add_parser("train", help="train a head; writes head.pth, metrics.jsonl, results.json, samples/")
    t.add_argument("--train", required=True, help="7scenes:train, or a folder / .tar.gz with rgb/ + depth/")
    t.add_argument("--val", help="evaluation set (7scenes:val, nyu-samples, kitti-samples, a folder)")
    t.add_argument("--head", default="lin1", choices=["lin1", "lin4", "dpt"])
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (official 1e-4 over 38,400 "
                   "iterations)")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-loss", type=float, default=0.0, help="gradient-loss weight (official KITTI config: 0.5)")
    t.add_argument("--augment", action="store_true", help="random crop + flip, backbone every step (slow); "
                   "default: backbone features computed once and cached")
    t.add_argument("--crop-fraction", type=float, default=0.875, help="crop side / image side with --augment")
    t.add_argument("--bins", default="uniform", choices=["uniform", "log"], help="bin spacing (linear heads)")
    t.add_argument("--n-bins", type=int, default=256)
    t.add_argument("--norm-strategy", default="linear", choices=["linear", "softmax", "sigmoid"],
                   help="bin weights: linear = (relu + 0.1) / sum (official), softmax, sigmoid")
    t.add_argument("--dpt-channels", type=int, default=256, help="DPT fusion width (official 256)")
    t.add_argument("--final-norm", action="store_true", help="use tokens after the final LayerNorm (official: before)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, help="run folder (default runs/depth-<head>-<model>)")
    e = dsub.add_parser("eval", help="RMSE, AbsRel, log10, delta<1.25^k of a head on a data set")
    e.add_argument("--head", required=True, help="run folder, head.pth, or an official name (dinov2_vits14_nyu_dpt)")
    e.add_argument("--data", required=True, help="nyu-samples, kitti-samples, 7scenes:val, or a folder / .tar.gz")
    e.add_argument("--out", type=Path, help="run folder (default runs/depth-eval-<head>)")
    r = dsub.add_parser("predict", help="colourised depth PNGs (colour bar in metres) and float32 .npy maps")
    r.add_argument("images", nargs="+", help="image files, folders or .txt list files")
    r.add_argument("--head", required=True, help="run folder, head.pth, or an official name")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    for q in (t, e, r):
        q.add_argument("--short-side", type=int, help="resize so the short side is this (default: native size, "
                       "centre-padded to the patch size)")
        q.add_argument("--unpad", default="crop", choices=["crop", "stretch"], help="crop: cut the padding off the "
                       "prediction (aligned); stretch: resize it away as the official code does")
        q.add_argument("--no-progress", action="store_true")
        if q is not r:
            g = q.add_argument_group("depth range and crop (named data sets bring their own: NYU 10 m + Eigen, "
                                     "KITTI 80 m + Garg, 7-Scenes 10 m)")
            g.add_argument("--min-depth", type=float, help="valid ground truth from (m, default 0.001)")
            g.add_argument("--max-depth", type=float, help="valid ground truth up to (m, default 10)")
            g.add_argument("--crop", choices=["eigen", "garg", "none"], help="evaluation crop")
            g.add_argument("--png-scale", type=float, default=1000.0, help="depth PNG units per metre (1000 = mm)")
            g.add_argument("--data-root", help="folder holding sevenscenes_redkitchen/ and depth_samples_nyu_kitti/ "
                           "(default $DINOLAB_DEPTH_DATA or ../shared/data)")
            q.add_argument("--save-png", type=int, default=4, help="draw this many image | truth | prediction figures")
        if q is not t:
            q.add_argument("--flip-tta", action="store_true", help="average with the mirrored image (official test)")
            q.add_argument("--head-sha256", help="expected SHA-256 of the head file")
            q.add_argument("--head-max-depth", type=float, help="output range of a head file that does not say "
                           "(official names: NYU 10, KITTI 80)")
        _add_model_args(q, default="dinov2_vits14" if q is t else None)
        q.set_defaults(func=cmd_depth)


def cmd_match(args: argparse.Namespace) -> None:
    from dinolab.viz.matching import draw_matches, match_patches, save_matches_json

    matches = match_patches(_load(args), args.images[0], args.images[1], foreground=args.foreground,
                            threshold=args.threshold, foreground_rule=args.foreground_rule,
                            short_side=args.short_side, device=args.device)
    draw_matches(args.images[0], args.images[1], matches, args.out, max_lines=args.max_lines)
    js = args.json or args.out.with_suffix(".json")
    save_matches_json(matches, js, image1=str(args.images[0]), image2=str(args.images[1]), model=str(args.model),
                      foreground=args.foreground)
    print(f"{len(matches)} mutual nearest-neighbour matches; wrote {args.out} and {js}")


def _add_match_parser(sub) -> None:
    """``dinolab match img1 img2``."""
    p = sub.add_parser("match", help="patch correspondences between two images (mutual nearest neighbours)",
                       description="Mutual nearest neighbours (cosine) between the patch features of two images, "
                       "optionally only on the PCA foreground; draws the images side by side with a line per "
                       "match and writes the matches (pixel centres, patches, similarity) as JSON.")
    p.add_argument("images", nargs=2, help="two image files")
    p.add_argument("--out", type=Path, default=Path("outputs/match.png"), help="PNG (default: %(default)s)")
    p.add_argument("--json", type=Path, help="matches JSON (default: --out with .json)")
    p.add_argument("--foreground", action="store_true", help="match only PCA-foreground patches")
    p.add_argument("--foreground-rule", default="auto", choices=["auto", "minority"],
                   help="how PC1's sign is chosen (auto: image borders are background)")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground threshold on PC1, in std units")
    p.add_argument("--short-side", type=int, default=448, help="resize so the short side is about this (px)")
    p.add_argument("--max-lines", type=int, default=100, help="draw the most similar N matches (JSON has all)")
    _add_model_args(p)
    p.set_defaults(func=cmd_match)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from dinolab.serve.app import serve
    except ImportError as e:
        raise DinolabError(f"dinolab serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'dinolab[serve]' (or run ./serve.sh)") from None
    from dinolab.serve.settings import load_settings

    settings = load_settings(
        args.config, host=args.host, port=args.port, device=args.device, model=args.model,
        weights=str(args.weights) if args.weights else None,
        arch=args.arch, sha256=args.sha256, random_init=args.random_init or None, seg_head=args.seg_head,
        depth_head=args.depth_head, short_side=args.short_side, index=args.index, images_root=args.images_root,
        fallback=False if args.no_fallback else None, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
        timeout_s=args.timeout, max_queue=args.max_queue)
    serve(settings, announce=lambda line: print(line, flush=True), log_level="debug" if args.verbose else "info")


def _add_serve_parser(sub) -> None:
    """``dinolab serve``."""
    p = sub.add_parser("serve", help="web demo + JSON/HTTP API (PCA, segmentation, depth, retrieval, matching)",
                       description="Start a web page and an HTTP API (FastAPI, OpenAPI at /docs) over DINOv2 "
                       "backbones. Offline without the official weights it says so and serves a small model it "
                       "pretrains itself once (about 3 minutes on 2 CPU cores, then cached). Flags override "
                       "--config; --model/--weights/--seg-head/--depth-head apply to the first model.")
    p.add_argument("--config", type=Path, help="serve.yaml (host, port, models with heads, index, limits)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--seg-head", help="segmentation head: official name (dinov2_vits14_ade20k_linear) or a "
                   "`dinolab seg train` run folder / head.pth")
    p.add_argument("--depth-head", help="depth head: official name (dinov2_vits14_nyu_linear4) or a head.pth")
    p.add_argument("--short-side", type=int, help="inference short side in px (default: 32 patches)")
    p.add_argument("--index", help="`dinolab index build` folder for retrieval")
    p.add_argument("--images-root", help="folder the indexed ids are relative to (thumbnails)")
    p.add_argument("--no-fallback", action="store_true", help="without official weights, stop with the message "
                   "instead of serving the self-pretrained fallback model")
    p.add_argument("--max-upload-mb", type=float, help="largest upload per image (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest width x height (default 40,000,000)")
    p.add_argument("--timeout", type=float, help="seconds before a request gets 504 (default 120)")
    p.add_argument("--max-queue", type=int, help="model jobs waiting at once before 503 (default 32)")
    _add_model_args(p, default=None)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dinolab", description="DINOv2 backbones: features, PCA part colouring, "
                                 "weight conversion. `dinolab <command> --help` explains each command.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("models", help="list the known backbones and whether their weights are cached")
    p.add_argument("--official", action="store_true", help="only the 8 official variants")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="fetch official weights into the cache (for later offline use)")
    p.add_argument("names", nargs="+", help="official variant names, e.g. dinov2_vits14 dinov2_vitb14_reg")
    p.add_argument("--sha256", help="expected SHA-256 (Meta publishes none; recorded at first download)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("embed", help="images -> features on disk (CLS, mean patch, registers), resumable",
                       description="Embed a folder (recursive), a .txt list file, or image paths. Writes "
                       "cls.npy (+ patch_mean.npy, registers.npy) or features.safetensors, ids.txt, skipped.txt "
                       "and meta.json into --out. Re-run the same command to resume an interrupted run.")
    p.add_argument("images", nargs="+", help="a folder, a .txt list file, or image files")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pooling", default="cls", help="comma list of cls,patch_mean,registers (default: cls)")
    p.add_argument("--format", default="npy", choices=["npy", "safetensors"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: min(8, CPUs))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--resize", type=int, default=256, help="short side before the centre crop (default 256)")
    p.add_argument("--crop", type=int, default=224, help="centre crop (default 224)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("pca", help="the DINOv2 PCA part-colouring figure for a set of images",
                       description="PCA of patch features across images: the first component separates "
                       "foreground from background; the next three, fitted on the foreground, become RGB, "
                       "so matching parts get matching colours across images. Without images, uses sample "
                       "photos shipped with scikit-image.")
    p.add_argument("images", nargs="*", help="image files (default: scikit-image sample photos)")
    p.add_argument("--samples", help="comma list of scikit-image sample names instead of files")
    p.add_argument("--out", type=Path, default=Path("outputs/pca.png"), help="PNG path (default: %(default)s)")
    p.add_argument("--short-side", type=int, default=448, help="resize so the short side is about this (px)")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground threshold on PC1, in std units")
    p.add_argument("--foreground", default="auto", choices=["auto", "minority", "all"],
                   help="how PC1's sign is chosen (auto: image borders are background); all = no masking")
    p.add_argument("--no-mask", action="store_true", help="leave out the foreground-mask row")
    _add_model_args(p)
    p.set_defaults(func=cmd_pca)

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
        e.add_argument("--few-shot", type=int, help="use only N training images per class")
        e.add_argument("--resize", type=int, default=256, help="short side before the centre crop (256; "
                       "use 32 for CIFAR-size models)")
        e.add_argument("--crop", type=int, default=224, help="centre crop (224; 32 for CIFAR-size models)")
        e.add_argument("--batch-size", type=int, default=256)
        e.add_argument("--num-workers", type=int, default=0, help="decoding processes")
        e.add_argument("--seed", type=int, default=0)
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
        _add_model_args(e)
        e.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="self-supervised DINOv2 pretraining on unlabelled images",
                       description="Pretrain with the DINOv2 recipe (DINO + iBOT + KoLeo, multi-crop, EMA "
                       "teacher). Writes config.yaml, metrics.jsonl, checkpoints/, loss.png, results.json and "
                       "teacher_backbone.pth (official layout) into train.output_dir. Re-run the same command "
                       "to resume from the newest checkpoint.")
    p.add_argument("--config", default="cpu-smoke", help="preset (vits14, vitb14, vitl14, vitg14, cifar10, "
                   "cpu-smoke) or a YAML file (may say `base: <preset>`)")
    p.add_argument("--data", required=True, help="a folder of images (recursive), a .txt list file, uncompressed .tar "
                   "shards (a shard or a folder of them), or cifar10:train")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 train.epochs=5")
    p.add_argument("--eval-train", help="labelled kNN bank for periodic evaluation, e.g. cifar10:train")
    p.add_argument("--eval-test", help="labelled kNN queries, e.g. cifar10:test (every train.eval_every its)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    _add_index_parser(sub)
    _add_curate_parser(sub)
    _add_seg_parser(sub)
    _add_depth_parser(sub)
    _add_match_parser(sub)
    _add_serve_parser(sub)

    p = sub.add_parser("convert", help="save a backbone in the official .pth layout or as a HuggingFace folder")
    p.add_argument("--out", type=Path, required=True, help="a .pth file (official) or a folder (hf)")
    p.add_argument("--to", default="official", choices=["official", "hf"])
    _add_model_args(p, default=None)
    p.set_defaults(func=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except DinolabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
