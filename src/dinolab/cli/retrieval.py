"""`dinolab index` (retrieval, revisited Oxford/Paris) and `dinolab curate` (data curation)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dinolab.cli.common import (
    add_model_args,
    add_overwrite_arg,
    add_progress_arg,
    check_out_dir,
    load_backbone,
)
from dinolab.errors import DinolabError

log = logging.getLogger("dinolab")


def cmd_index(args: argparse.Namespace) -> None:
    from dinolab.curate import retrieval
    from dinolab.curate.index import load_index

    if args.action == "build":
        kw = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe), ("hnsw_m", args.hnsw_m),
                                ("ef_search", args.ef_search), ("pq_m", args.pq_m)) if v is not None}
        check_out_dir(args.out, args.overwrite, ("meta.json",))
        index = retrieval.build_index(args.embeddings, args.out, key=args.key, kind=args.kind, **kw)
        print(f"indexed {len(index)} images into {args.out} ({index.kind})")
        return
    if args.action == "revisited":
        from dinolab.curate.revisited import SETTINGS, evaluate_revisited
        from dinolab.io import atomic_write_json

        out = check_out_dir(args.out or Path("runs") / f"revisited-{args.dataset}-{Path(str(args.model)).stem}",
                            args.overwrite)
        res = evaluate_revisited(load_backbone(args), args.root, args.dataset, resize=args.resize,
                                 crop=args.crop or None, batch_size=args.batch_size, device=args.device,
                                 num_workers=args.num_workers, progress=not args.no_progress)
        res["model"] = str(args.model)
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
        model = load_backbone(args)
    search_kw = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    if search_kw and index.kind == "exact":
        raise DinolabError("--nprobe / --ef-search apply to faiss indexes; this index is exact")
    results = retrieval.search(index, k=args.k, model=model, images=images, ids=args.id, device=args.device,
                               resize=args.resize, crop=args.crop, progress=False if args.no_progress else None,
                               **search_kw)
    retrieval.save_results(results, args.out)
    if args.sheet:
        retrieval.contact_sheet(results, args.images_root or index.info.get("id_root"), args.sheet)
    skipped = sum("skipped" in r for r in results)
    print(json.dumps(results[:3], indent=1) + (f"\n... ({len(results)} queries)" if len(results) > 3 else ""))
    print(f"results: {args.out}" + (f", sheet: {args.sheet}" if args.sheet else "")
          + (f" ({skipped} unreadable query images skipped, listed there)" if skipped else ""))


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
    add_overwrite_arg(b)
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
    add_progress_arg(q)
    add_model_args(q, default=None)
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
    add_progress_arg(r)
    add_overwrite_arg(r)
    add_model_args(r)
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
        summary = run_pipeline(cfg, model=load_backbone(args) if need_model else None, model_id=str(args.model),
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
        add_progress_arg(c)
        if stage == "run":
            c.add_argument("--images", help="images to embed first (folder or .txt list) instead of --embeddings")
            add_model_args(c)
        else:
            c.add_argument("--input", help="manifest of the images to start from (default: the previous finished "
                           "stage in --out, else the whole pool)")
            c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        c.set_defaults(func=cmd_curate)


def add_parsers(sub) -> None:
    _add_index_parser(sub)
    _add_curate_parser(sub)
