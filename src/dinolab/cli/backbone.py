"""`dinolab models | download | embed | pca | convert`: backbones and their features."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from dinolab.cli.common import (
    add_model_args,
    add_overwrite_arg,
    add_progress_arg,
    load_backbone,
    load_backbone_or_embedded,
    model_options,
)
from dinolab.errors import DinolabError

log = logging.getLogger("dinolab")


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
    if not args.official:
        from dinolab.models import embedded

        a = embedded.embedded_info()["architecture"]
        print(f"{embedded.EMBEDDED_NAME:28s} {a['embed_dim']:5d} {a['depth']:5d} {a['patch_size']:5d} "
              f"{a['num_register_tokens']:4d}  shipped with dinolab (demo model; see its MODEL_CARD.md)")


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
    options = {**model_options(args), "precision": args.precision}
    res = embed(load_backbone(args), images, args.out, model_id=str(args.model), model_key=options,
                transform=make_classification_transform(args.resize, args.crop), batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, autocast=autocast,
                pooling=args.pooling.split(","), fmt=args.format, shard_size=args.shard_size,
                overwrite=args.overwrite, progress=not args.no_progress)
    if res.count == 0:  # the folder holds the reasons; an empty result is not a success
        raise DinolabError(f"none of the {len(res.skipped)} images could be decoded; the reasons are in "
                           f"{Path(res.out_dir) / 'skipped.txt'}")
    if get_rank() == 0:
        print(f"embedded {res.count} images into {res.out_dir} ({len(res.skipped)} skipped, listed in skipped.txt)")


def cmd_pca(args: argparse.Namespace) -> None:
    from dinolab.viz.pca import pca_figure, sample_images

    images = args.images or sample_images(args.samples.split(",") if args.samples else None)
    model, short_side, name = load_backbone_or_embedded(args)
    out = pca_figure(model, images, args.out, short_side=short_side, threshold=args.threshold,
                     foreground=args.foreground, show_mask=not args.no_mask,
                     device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), model_name=name)
    print(f"wrote {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from dinolab.models.checkpoints import save_hf_folder, save_official

    model = load_backbone(args)
    out = save_hf_folder(model, args.out) if args.to == "hf" else save_official(model, args.out)
    print(f"wrote {out}")


def add_parsers(sub) -> None:
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
    add_overwrite_arg(p, help="start over in a non-empty --out (default: resume the run there, refused when "
                      "the model, weights or options differ)")
    add_progress_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("pca", help="the DINOv2 PCA part-colouring figure for a set of images",
                       description="PCA of patch features across images: the first component separates "
                       "foreground from background; the next three, fitted on the foreground, become RGB, "
                       "so matching parts get matching colours across images. Without images, uses sample "
                       "photos shipped with scikit-image.")
    p.add_argument("images", nargs="*", help="image files (default: scikit-image sample photos)")
    p.add_argument("--samples", help="comma list of scikit-image sample names instead of files")
    p.add_argument("--out", type=Path, default=Path("outputs/pca.png"), help="PNG path (default: %(default)s)")
    p.add_argument("--short-side", type=int, help="resize so the short side is about this (px; default 32 "
                   "patches: 448 for patch 14; the embedded model: 224)")
    p.add_argument("--fallback", choices=["embedded", "off"], default="embedded", help="offline without the "
                   "official weights: use the small model shipped with dinolab and say so (embedded, default), "
                   "or stop with the message (off)")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground threshold on PC1, in std units")
    p.add_argument("--foreground", default="auto", choices=["auto", "minority", "all"],
                   help="how PC1's sign is chosen (auto: image borders are background); all = no masking")
    p.add_argument("--no-mask", action="store_true", help="leave out the foreground-mask row")
    add_model_args(p)
    p.set_defaults(func=cmd_pca)


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="save a backbone in the official .pth layout or as a HuggingFace folder")
    p.add_argument("--out", type=Path, required=True, help="a .pth file (official) or a folder (hf)")
    p.add_argument("--to", default="official", choices=["official", "hf"])
    add_model_args(p, default=None)
    p.set_defaults(func=cmd_convert)
