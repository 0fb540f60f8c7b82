"""`dinolab serve`: the web demo and HTTP API."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dinolab.cli.common import add_model_args
from dinolab.errors import DinolabError

log = logging.getLogger("dinolab")


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
        fallback="off" if args.no_fallback else args.fallback, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
        timeout_s=args.timeout, max_queue=args.max_queue, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins))
    serve(settings, announce=lambda line: print(line, flush=True), log_level="debug" if args.verbose else "info")


def _names(values: list[str] | None) -> list[str] | None:
    """``--allowed-hosts a,b --allowed-hosts c`` -> ``["a", "b", "c"]`` (None when not given)."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _add_serve_parser(sub) -> None:
    """``dinolab serve``."""
    p = sub.add_parser("serve", help="web demo + JSON/HTTP API (PCA, segmentation, depth, retrieval, matching)",
                       description="Start a web page and an HTTP API (FastAPI, OpenAPI at /docs) over DINOv2 "
                       "backbones. Offline without the official weights it says so and serves the small embedded "
                       "model shipped with dinolab (--fallback train: one it pretrains itself first). Flags override "
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
    p.add_argument("--fallback", choices=["embedded", "train", "off"], help="without the official weights "
                   "(offline, nothing cached): serve the embedded model shipped with dinolab, with its "
                   "segmentation and depth heads (embedded, the default); pretrain a small model on sample photos "
                   "first (train: minutes on a CPU, once, then cached); or stop with the message (off)")
    p.add_argument("--no-fallback", action="store_true", help="same as --fallback off")
    p.add_argument("--max-upload-mb", type=float, help="largest upload per image (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest width x height (default 40,000,000)")
    p.add_argument("--timeout", type=float, help="seconds before a request gets 504 (default 120)")
    p.add_argument("--max-queue", type=int, help="model jobs waiting at once before 503 (default 32)")
    p.add_argument("--header-timeout", type=float, help="seconds a connection has to send its request headers "
                   "(default 10)")
    p.add_argument("--body-timeout", type=float, help="seconds a request has to send its body before 408 "
                   "(default 60)")
    p.add_argument("--allowed-hosts", action="append", metavar="NAMES", help="comma list of Host names accepted "
                   "besides localhost, 127.0.0.1, ::1 and --host (e.g. myhost.lan,192.168.1.5; '*.lan'; '*': any)")
    p.add_argument("--allowed-origins", action="append", metavar="ORIGINS", help="comma list of other sites "
                   "(https://app.example.com) whose pages may POST to the API ('*': any; default: none)")
    add_model_args(p, default=None, seed=False)
    p.set_defaults(func=cmd_serve)


def add_parsers(sub) -> None:
    _add_serve_parser(sub)
