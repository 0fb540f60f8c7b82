"""Helpers shared by the subcommands: the model options and loading the backbone they name."""

from __future__ import annotations

import argparse
from pathlib import Path

from dinolab.errors import DinolabError


def add_model_args(p: argparse.ArgumentParser, default: str | None = "dinov2_vits14") -> None:
    """--model / --weights / --arch / --sha256 / --random-init / --device, as every backbone command takes them."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help="variant name (see `dinolab models`), or a checkpoint "
                   "path (.pth/.safetensors, official/HF/timm layout) or HF folder (default: %(default)s)")
    g.add_argument("--weights", type=Path, help="weights file for a named variant, instead of the cached "
                   "or downloaded official file")
    g.add_argument("--arch", help="variant whose architecture a checkpoint path has (default: inferred)")
    g.add_argument("--sha256", help="expected SHA-256 of the weights file")
    g.add_argument("--random-init", action="store_true", help="random weights for a named variant (smoke tests)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def load_backbone(args: argparse.Namespace):
    """The backbone the model options name (``dinolab.load_model``)."""
    from dinolab.models import load_model

    if args.model is None:
        raise DinolabError("pass --model NAME_OR_PATH")
    return load_model(args.model, weights=args.weights, arch=args.arch, sha256=args.sha256,
                      pretrained=not args.random_init)



def load_backbone_or_embedded(args: argparse.Namespace, patches: int = 32):
    """``(backbone, short side)``: the model the options name or, when that is an official name whose
    weights are neither cached nor downloadable and ``args.fallback`` is ``embedded``, the embedded
    model shipped with dinolab (one warning line says which file to download where). The short side is
    ``args.short_side`` or ``patches`` patches (the embedded model: its own default)."""
    import logging

    from dinolab.errors import WeightsNotFoundError
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
        return embedded.load_embedded(device=getattr(args, "device", None)), args.short_side or embedded.SHORT_SIDE
    return model, args.short_side or patches * int(model.patch_size)
