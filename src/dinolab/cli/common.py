"""What the subcommands share, defined once: the model options and loading the backbone they name,
the shared flags (``--seed``, ``--limit`` / ``--test-limit`` / ``--few-shot``, ``--no-progress``,
``--overwrite``, ``--debug``) and what they do.

Subsets (``--limit N``): a random subset of N images drawn with ``--seed`` (so classes stay mixed,
unlike the first N of a sorted folder) and kept in the data set's order; ``--test-limit N`` gives the
test / validation set its own N; ``--few-shot K`` keeps K training images per class first.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dinolab.errors import DinolabError, WeightsNotFoundError

log = logging.getLogger("dinolab")

D = TypeVar("D")


def _has_flag(p: argparse.ArgumentParser, flag: str) -> bool:
    return flag in p._option_string_actions


def add_seed_arg(p: argparse.ArgumentParser) -> None:
    """``--seed`` (default 0), once per command: random init, subsets, splits, head init."""
    if not _has_flag(p, "--seed"):
        p.add_argument("--seed", type=int, default=0, help="random seed: --random-init weights, --limit subsets, "
                       "splits and head initialisation (default 0)")


def add_model_args(p: argparse.ArgumentParser, default: str | None = "dinov2_vits14", *, seed: bool = True) -> None:
    """--model / --weights / --arch / --sha256 / --random-init / --device (and ``--seed``), as every
    backbone command takes them."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help="variant name (see `dinolab models`), or a checkpoint "
                   "path (.pth/.safetensors, official/HF/timm layout) or HF folder (default: %(default)s)")
    g.add_argument("--weights", type=Path, help="weights file for a named variant, instead of the cached "
                   "or downloaded official file")
    g.add_argument("--arch", help="variant whose architecture a checkpoint path has (default: inferred)")
    g.add_argument("--sha256", help="expected SHA-256 of the weights file")
    g.add_argument("--random-init", action="store_true", help="random weights for a named variant (smoke tests), "
                   "seeded with --seed")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    if seed:
        add_seed_arg(p)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (logs and batch jobs)."""
    if not _has_flag(p, "--no-progress"):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_overwrite_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--overwrite``: write into an output folder that already holds this command's results."""
    p.add_argument("--overwrite", action="store_true", help=help or "write into an output folder that already "
                   "holds results (default: refuse, so a finished run is never replaced by accident)")


def add_subset_args(p: argparse.ArgumentParser, *, few_shot: bool = False) -> None:
    """``--limit`` / ``--test-limit`` (and ``--few-shot`` for labelled classification), plus ``--seed``."""
    g = p.add_argument_group("subsets (quick runs; a random subset drawn with --seed, kept in data-set order)")
    g.add_argument("--limit", type=int, metavar="N", help="use N images of each data set the command reads "
                   "(train and test / val)")
    g.add_argument("--test-limit", type=int, metavar="N", help="use N images of the test / val / --data set "
                   "(overrides --limit there)")
    if few_shot:
        g.add_argument("--few-shot", type=int, metavar="K", help="use only K training images per class (before "
                       "--limit)")
    add_seed_arg(p)


def take_subset(ds: D, n: int | None, seed: int = 0, what: str = "data") -> D:
    """``ds`` (anything with ``len`` and ``subset(indices)``) cut to ``n`` images drawn at random with
    ``seed``, in the original order; unchanged when ``n`` is None or >= ``len(ds)``."""
    if n is None:
        return ds
    if n < 1:
        raise DinolabError(f"--limit / --test-limit must be >= 1, got {n}")
    total = len(ds)  # type: ignore[arg-type]
    if n >= total:
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    log.info("using %d of %d images of %s (random subset, seed %d)", n, total, what, seed)
    return ds.subset(idx.tolist())  # type: ignore[attr-defined]


def subset_train(ds: D, args: argparse.Namespace, what: str = "the training set") -> D:
    """The training side of ``--few-shot`` / ``--limit``."""
    if getattr(args, "few_shot", None):
        from dinolab.data.datasets import few_shot

        ds = few_shot(ds, args.few_shot, seed=args.seed)  # type: ignore[arg-type]
    return take_subset(ds, args.limit, args.seed, what)


def subset_test(ds: D, args: argparse.Namespace, what: str = "the test set") -> D:
    """The test side: ``--test-limit``, else ``--limit``."""
    n = args.test_limit if args.test_limit is not None else args.limit
    return take_subset(ds, n, args.seed, what)


def check_out_dir(out: str | os.PathLike, overwrite: bool, markers: Sequence[str] = ("results.json",)) -> Path:
    """Refuse an output folder that already holds one of ``markers`` unless ``overwrite``."""
    out = Path(out)
    found = [m for m in markers if (out / m).exists()]
    if found and not overwrite:
        raise DinolabError(f"{out} already holds results ({found[0]}); pass --overwrite to replace them or choose "
                           "another --out")
    return out


def add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on the top-level parser and (so it may come after the command too) on every
    subcommand, whose copies leave the top-level value alone unless given."""
    parser.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    seen: set[int] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    if id(child) in seen:
                        continue
                    seen.add(id(child))
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="print the Python traceback of an error")
                    walk(child)

    walk(parser)


def _weights_source(args: argparse.Namespace) -> str:
    return str(args.weights) if getattr(args, "weights", None) else str(args.model)


def load_backbone(args: argparse.Namespace):
    """The backbone the model options name (``dinolab.load_model``). ``--random-init`` weights are
    drawn with ``--seed`` (reproducible, the global RNG left as it was). Any failure to read or fit
    the weights becomes a ``DinolabError`` naming the file."""
    import torch

    from dinolab.models import load_model

    if args.model is None:
        raise DinolabError("pass --model NAME_OR_PATH")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(args, "seed", 0) or 0)
            return load_model(args.model, weights=args.weights, arch=args.arch, sha256=args.sha256,
                              pretrained=not args.random_init)
    except (KeyboardInterrupt, MemoryError, WeightsNotFoundError):  # the last: callers may fall back
        raise
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        src = _weights_source(args)
        if src in msg:
            raise DinolabError(msg) from e
        raise DinolabError(f"cannot load the model from {src}: {msg}") from e


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model options that decide the weights (for a resumable job's run key)."""
    model = Path(str(args.model))
    out = {"model": str(model.resolve()) if model.exists() else str(args.model),
           "weights": str(Path(args.weights).resolve()) if args.weights else None,
           "arch": args.arch, "random_init": bool(args.random_init)}
    if args.random_init:
        out["seed"] = args.seed
    return out


def load_backbone_or_embedded(args: argparse.Namespace, patches: int = 32):
    """``(backbone, short side, model name)``: the model the options name or, when that is an official name whose
    weights are neither cached nor downloadable and ``args.fallback`` is ``embedded``, the embedded
    model shipped with dinolab (one warning line says which file to download where). The short side is
    ``args.short_side`` or ``patches`` patches (the embedded model: its own default)."""
    import logging

    from dinolab.models import embedded
    from dinolab.models.variants import is_variant_name

    try:
        model = load_backbone(args)
    except WeightsNotFoundError as e:
        named = args.model is not None and is_variant_name(str(args.model)) and args.weights is None
        if getattr(args, "fallback", "off") != "embedded" or not named:
            raise
        logging.getLogger("dinolab").warning("%s; using %s instead (--fallback off: stop here)", e,
                                             embedded.describe())
        short_side = args.short_side or embedded.SHORT_SIDE
        return embedded.load_embedded(device=getattr(args, "device", None)), short_side, embedded.EMBEDDED_NAME
    return model, args.short_side or patches * int(model.patch_size), str(args.model)
