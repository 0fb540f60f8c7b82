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

    autocast = {"auto": None, "fp32": False, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = args.images[0] if len(args.images) == 1 else args.images  # one folder / list file, or files
    res = embed(_load(args), images, args.out, model_id=str(args.model),
                transform=make_classification_transform(args.resize, args.crop), batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, autocast=autocast,
                pooling=args.pooling.split(","), fmt=args.format, shard_size=args.shard_size,
                overwrite=args.overwrite, progress=not args.no_progress)
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
    from dinolab.curate.index import ExactIndex

    if args.action == "build":
        index = retrieval.build_index(args.embeddings, args.out, key=args.key)
        print(f"indexed {len(index)} images into {args.out}")
        return
    index = ExactIndex.load(args.index)
    model = None
    if args.image:
        args.model = args.model or index.model_id or None
        model = _load(args)
    results = retrieval.search(index, k=args.k, model=model, images=args.image, ids=args.id, device=args.device)
    retrieval.save_results(results, args.out)
    if args.sheet:
        retrieval.contact_sheet(results, args.images_root, args.sheet)
    print(json.dumps(results[:3], indent=1) + (f"\n... ({len(results)} queries)" if len(results) > 3 else ""))
    print(f"results: {args.out}" + (f", sheet: {args.sheet}" if args.sheet else ""))


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

    p = sub.add_parser("index", help="image retrieval: build an exact index from `dinolab embed`, search it")
    isub = p.add_subparsers(dest="action", required=True, metavar="action")
    b = isub.add_parser("build", help="index the features of a finished `dinolab embed` folder")
    b.add_argument("--embeddings", type=Path, required=True, help="output folder of dinolab embed")
    b.add_argument("--out", type=Path, required=True, help="index folder to write")
    b.add_argument("--key", default="cls", help="which features: cls (default) or patch_mean")
    b.set_defaults(func=cmd_index)
    q = isub.add_parser("search", help="nearest indexed images of query images (--image) or indexed ids (--id)")
    q.add_argument("--index", type=Path, required=True)
    q.add_argument("--image", nargs="*", default=[], help="query image files (embedded with --model, by default "
                   "the model the index was built with)")
    q.add_argument("--id", nargs="*", default=[], help="ids already in the index (the id itself is excluded)")
    q.add_argument("-k", type=int, default=10, help="neighbours per query")
    q.add_argument("--out", type=Path, default=Path("search.json"), help="results JSON (default search.json)")
    q.add_argument("--sheet", type=Path, help="also write a contact-sheet PNG (query + neighbours)")
    q.add_argument("--images-root", type=Path, help="folder the indexed ids are relative to (for --sheet)")
    _add_model_args(q, default=None)
    q.set_defaults(func=cmd_index)

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
