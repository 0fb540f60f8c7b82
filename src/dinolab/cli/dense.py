"""`dinolab seg | depth | match`: dense tasks on frozen patch features."""

from __future__ import annotations

import argparse
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
        out = check_out_dir(args.out or Path("runs") / f"seg-{args.head}-{Path(str(args.model)).stem}",
                            args.overwrite, ("results.json", "head.pth"))
        train = subset_train(_seg_dataset(args.train, args), args, f"--train {args.train}")
        val = subset_test(_seg_dataset(args.val, args), args, f"--val {args.val}") if args.val else None
        opts = seg.TrainOptions(head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                weight_decay=args.weight_decay, short_side=args.short_side or 448,
                                round_to_patch=not args.no_round, augment=args.augment, crop=args.train_crop,
                                class_weights=args.class_weights, seed=args.seed, num_workers=args.num_workers,
                                cache_dtype=args.cache_dtype)
        res = seg.run_seg_train(load_backbone(args), train, val, opts, inference=_seg_inference(args, Inference()),
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
        out = check_out_dir(args.out or Path("runs") / f"seg-eval-{Path(str(args.head)).stem}", args.overwrite)
        data = subset_test(_seg_dataset(args.data, args), args, f"--data {args.data}")
        res = seg.run_seg_eval(load_backbone(args), ckpt, data, inference=inference,
                               short_side=short, round_to_patch=rounded, model_id=str(args.model), out_dir=out,
                               device=args.device, progress=progress)
        print(seg.format_table(res))
        print(f"results: {out / 'results.json'}")
    else:
        check_out_dir(args.out, args.overwrite, ("predictions.json",))
        images = args.images[0] if len(args.images) == 1 else args.images
        from dinolab.eval.segmentation_predict import run_seg_predict

        recs = run_seg_predict(load_backbone(args), ckpt, images, args.out, inference=inference, short_side=short,
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
        add_progress_arg(q)
        add_overwrite_arg(q)
        if q is not r:
            add_subset_args(q)
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
        add_model_args(q, default="dinov2_vits14" if q is t else None)
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
    model = load_backbone(args) if args.model else None
    loaded = load_depth_head(source, embed_dim=model.embed_dim if model else None,
                             depth=len(model.blocks) if model else None, max_depth=args.head_max_depth,
                             sha256=args.head_sha256)
    if model is None:
        args.model = loaded.backbone
        model = load_backbone(args)  # raises "pass --model" when the head does not name its backbone
    check_backbone(model, loaded.config)
    return model, loaded


def cmd_depth(args: argparse.Namespace) -> None:
    from dinolab.eval import depth
    from dinolab.eval.depth_predict import format_depth_table

    progress = not args.no_progress
    common = {"short_side": args.short_side, "unpad": args.unpad, "device": args.device, "progress": progress}
    if args.action == "train":
        out = check_out_dir(args.out or Path("runs") / f"depth-{args.head}-{Path(str(args.model)).stem}",
                            args.overwrite, ("results.json", "head.pth"))
        train = subset_train(_depth_dataset(args.train, args), args, f"--train {args.train}")
        val = subset_test(_depth_dataset(args.val, args), args, f"--val {args.val}") if args.val else None
        settings = {"n_bins": args.n_bins, "bins": args.bins, "norm_strategy": args.norm_strategy,
                    "final_norm": args.final_norm}
        if args.head == "dpt":
            settings = {"channels": args.dpt_channels, "final_norm": args.final_norm}
        res, _ = depth.train_depth_head(
            load_backbone(args), train, val, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, grad_loss=args.grad_loss, augment=args.augment,
            crop_fraction=args.crop_fraction, seed=args.seed, out_dir=out, save_png=args.save_png,
            model_id=str(args.model), **common, **settings)
        print(format_depth_table(res))
        print(f"head: {out / 'head.pth'}  results: {out / 'results.json'}")
        return
    out = args.out or Path("runs") / f"depth-eval-{Path(str(args.head)).stem}"
    check_out_dir(out, args.overwrite, ("results.json",) if args.action == "eval" else ("predictions.json",))
    model, loaded = _depth_head(args)
    if args.action == "eval":
        data = subset_test(_depth_dataset(args.data, args), args, f"--data {args.data}")
        res = depth.evaluate_depth(model, loaded, data, flip_tta=args.flip_tta,
                                   out_dir=out, save_png=args.save_png, model_id=str(args.model),
                                   head_id=str(args.head), **common)
        print(format_depth_table(res))
        print(f"results: {out / 'results.json'}")
    else:
        from dinolab.eval.depth_predict import predict_images

        images = args.images[0] if len(args.images) == 1 else args.images
        rows = predict_images(model, loaded, images, args.out, flip_tta=args.flip_tta, head_id=str(args.head),
                              **common)
        done = sum("png" in r for r in rows)
        print(f"wrote {done} depth maps (PNG + float32 metres .npy) to {args.out} ({len(rows) - done} skipped); "
              "see predictions.json")


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
        add_progress_arg(q)
        add_overwrite_arg(q)
        if q is not r:
            add_subset_args(q)
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
        add_model_args(q, default="dinov2_vits14" if q is t else None)
        q.set_defaults(func=cmd_depth)


def cmd_match(args: argparse.Namespace) -> None:
    from dinolab.viz.matching import draw_matches, match_patches, save_matches_json

    matches = match_patches(load_backbone(args), args.images[0], args.images[1], foreground=args.foreground,
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
    add_model_args(p)
    p.set_defaults(func=cmd_match)


def add_parsers(sub) -> None:
    _add_seg_parser(sub)
    _add_depth_parser(sub)
    _add_match_parser(sub)
