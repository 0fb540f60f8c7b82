"""Table of backbone variants and their official weights.

Official names follow ``torch.hub`` (``dinov2_vits14``, ``dinov2_vitg14_reg``); every official
variant also answers to its timm name (``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``).
Small variants for our own training are generated below (``vit_tiny_patch4``, ``vit_small_patch8_reg4``...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class Variant:
    """Everything needed to build one backbone and find its weights."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518
    ffn: str = "mlp"
    ffn_hidden: int = 0  # 0 -> 4 * embed_dim
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layerscale: float | None = 1e-5  # LayerScale init; None: blocks without LayerScale (ls*.gamma)
    url: str | None = None
    sha256: str | None = None  # Meta publishes none; see checkpoints.download_weights
    aliases: tuple[str, ...] = ()

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``DinoVisionTransformer`` for this variant."""
        d = asdict(self)
        for k in ("name", "url", "sha256", "aliases"):
            d.pop(k)
        d["ffn_hidden"] = d["ffn_hidden"] or 4 * self.embed_dim
        return d


# size -> (embed_dim, depth, num_heads, ffn, ffn_hidden, timm size word)
_SIZES = {
    "s": (384, 12, 6, "mlp", 0, "small"),
    "b": (768, 12, 12, "mlp", 0, "base"),
    "l": (1024, 24, 16, "mlp", 0, "large"),
    # ViT-g: SwiGLU with hidden (int(2/3 * 4 * 1536) + 7) // 8 * 8 = 4096, as the official "swiglufused".
    "g": (1536, 40, 24, "swiglu", 4096, "giant"),
}


def _official() -> list[Variant]:
    out = []
    for size, (dim, depth, heads, ffn, hidden, word) in _SIZES.items():
        for reg in (False, True):
            name = f"dinov2_vit{size}14" + ("_reg" if reg else "")
            stem = f"dinov2_vit{size}14"
            out.append(Variant(
                name=name, embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn, ffn_hidden=hidden,
                num_register_tokens=4 if reg else 0,
                # register models were trained with explicit-size, antialiased pos-embed resizing
                interpolate_offset=0.0 if reg else 0.1,
                interpolate_antialias=reg,
                url=f"{_BASE_URL}/{stem}/{stem}{'_reg4' if reg else ''}_pretrain.pth",
                aliases=(f"vit_{word}_patch14{'_reg4' if reg else ''}_dinov2",),
            ))
    return out


def _own() -> list[Variant]:
    """Small and standard ViTs for our own training: any size x patch {4, 8, 14, 16} x registers."""
    sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    out = []
    for word, (dim, depth, heads) in sizes.items():
        for patch, img in ((4, 32), (8, 32), (14, 224), (16, 224)):
            for reg in (0, 4):
                out.append(Variant(
                    name=f"vit_{word}_patch{patch}" + (f"_reg{reg}" if reg else ""),
                    embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=img,
                    num_register_tokens=reg, interpolate_offset=0.0, interpolate_antialias=True,
                ))
    return out


VARIANTS: dict[str, Variant] = {v.name: v for v in _official() + _own()}
_ALIASES: dict[str, str] = {a: v.name for v in VARIANTS.values() for a in v.aliases}


def is_variant_name(name: str) -> bool:
    """Whether ``name`` is an official, timm or own variant name (not a file path)."""
    return name in VARIANTS or name in _ALIASES


def get_variant(name: str, **overrides: Any) -> Variant:
    """Look up a variant by official, timm or own name; ``overrides`` replace fields (e.g. img_size)."""
    key = _ALIASES.get(name, name)
    if key not in VARIANTS:
        raise KeyError(f"unknown model {name!r}; dinolab.list_models() shows the {len(VARIANTS)} known names")
    return replace(VARIANTS[key], **overrides) if overrides else VARIANTS[key]


def list_models(official_only: bool = False) -> list[str]:
    """Names of all known variants (official ones first)."""
    return [v.name for v in VARIANTS.values() if v.url or not official_only]
