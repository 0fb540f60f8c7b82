"""Backbones: the ViT, the table of variants, and weight loading / conversion."""

from __future__ import annotations

from typing import Any

from dinolab.models.variants import Variant, get_variant, list_models
from dinolab.models.vit import BackboneOutput, DinoVisionTransformer


def create_model(name: str, **overrides: Any) -> DinoVisionTransformer:
    """Build a randomly initialised backbone by name; ``overrides`` change variant fields
    (``img_size``, ``depth``, ``num_register_tokens`` ...)."""
    return DinoVisionTransformer(**get_variant(name, **overrides).model_kwargs())


from dinolab.models.checkpoints import load_model, save_hf_folder, save_official

__all__ = [
    "BackboneOutput",
    "DinoVisionTransformer",
    "Variant",
    "create_model",
    "get_variant",
    "list_models",
    "load_model",
    "save_hf_folder",
    "save_official",
]
