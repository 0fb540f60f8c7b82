"""The models a server holds: backbones with their optional heads, found by name.

``resolve_models(settings)`` loads what the settings ask for. An official name whose weights are
neither cached nor downloadable (offline) is replaced, with one warning line that says which file to
download where, by a fallback (``settings.fallback``): ``embedded`` (default) serves the model
shipped in the package (:mod:`dinolab.models.embedded`, with its CamVid segmentation and 7-Scenes
depth heads) at once; ``train`` pretrains a small model on sample photos first
(:mod:`dinolab.serve.fallback`, minutes on a CPU, then cached); ``off`` ends the start-up with the
message instead.

Tests and embedding applications skip all that and hand backbones over directly::

    registry = ModelRegistry([ServedModel.wrap(dinolab.create_model("vit_tiny_patch4", depth=2))])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dinolab.data.transforms import MAX_LONG_SIDE_FACTOR
from dinolab.errors import DinolabError, WeightsNotFoundError
from dinolab.serve.heads import DepthHead, SegmentationHead, load_depth_head, load_seg_head
from dinolab.serve.settings import ModelSpec, ServeSettings

log = logging.getLogger(__name__)

DEFAULT_PATCHES = 32  # default inference short side, in patches (448 px for patch 14)


@dataclass
class ServedModel:
    """A backbone ready to serve.

    Attributes:
        name: its id in the API (``?model=``) and on the page.
        backbone: a dinolab backbone (``model(x)`` -> ``BackboneOutput``), in eval mode.
        source: where it came from, for people (``official weights ...``, a path ...).
        kind: ``official``, ``checkpoint``, ``fallback``, ``random`` or ``injected``.
        short_side: inference short side in px; ``max_side`` caps the long side.
        notice: shown on the page under the model name (the fallback says how to get the official one).
        seg_head / depth_head: optional heads (see :mod:`dinolab.serve.heads`).
        model_id: what ``dinolab embed --model`` would have recorded for it (the name or path given);
            compared with an index's ``model_id`` (default: ``name``).
    """

    name: str
    backbone: nn.Module
    source: str = "given in Python"
    kind: str = "injected"
    short_side: int = 0
    notice: str | None = None
    seg_head: SegmentationHead | None = None
    depth_head: DepthHead | None = None
    model_id: str = ""

    def __post_init__(self) -> None:
        if not hasattr(self.backbone, "patch_size"):
            raise DinolabError(f"{self.name}: the backbone has no patch_size; give a dinolab backbone "
                               "(dinolab.load_model / dinolab.create_model)")
        self.backbone.eval()
        self.model_id = self.model_id or self.name
        if self.short_side <= 0:
            self.short_side = DEFAULT_PATCHES * self.patch_size

    @classmethod
    def wrap(cls, backbone: nn.Module, name: str = "model", **kw: Any) -> ServedModel:
        """A backbone built in Python (tests, notebooks) as a served model."""
        return cls(name=name, backbone=backbone, **kw)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    @property
    def max_side(self) -> int:
        return MAX_LONG_SIDE_FACTOR * self.short_side  # the CLI's dense transform caps alike

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about this model."""
        b = self.backbone
        return {
            "name": self.name, "kind": self.kind, "source": self.source, "notice": self.notice,
            "patch_size": self.patch_size, "embed_dim": int(b.embed_dim),
            "depth": len(getattr(b, "blocks", [])),
            "num_register_tokens": int(getattr(b, "num_register_tokens", 0)),
            "short_side": self.short_side, "max_side": self.max_side,
            "segmentation_head": self.seg_head.info() if self.seg_head else None,
            "depth_head": self.depth_head.info() if self.depth_head else None,
        }


class ModelRegistry:
    """Served models by name; the first is the default."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._models: dict[str, ServedModel] = {}
        for m in models:
            if m.name in self._models:
                raise DinolabError(f"two models are named {m.name!r}; give each a distinct `name:` in "
                                   "serve.yaml")
            self._models[m.name] = m
        if not self._models:
            raise DinolabError("no models to serve")

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def default(self) -> ServedModel:
        return next(iter(self._models.values()))

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None) -> ServedModel:
        """The model called ``name`` (None: the default); ``KeyError`` naming the served ones."""
        if name is None or name == "":
            return self.default
        if name not in self._models:
            raise KeyError(f"no model named {name!r}; served: {', '.join(self._models)}")
        return self._models[name]


# ------------------------------------------------------------------------------------------ loading


def _official_hint(name: str) -> str:
    """How to get an official variant's weights, in words."""
    from dinolab.models.checkpoints import cache_dir
    from dinolab.models.variants import get_variant

    v = get_variant(name)
    return (f"for the official {v.name}, download {v.url} to {cache_dir() / v.filename} "
            f"(or run `dinolab download {v.name}` with network, or pass --weights FILE) and restart")


def _fallback_model(spec: ModelSpec, settings: ServeSettings, progress: bool) -> ServedModel:
    """The model served instead of an official one whose weights cannot be had (``settings.fallback``)."""
    if settings.fallback == "train":
        return _trained_fallback(spec, settings, progress)
    from dinolab.models import embedded

    backbone = embedded.load_embedded(device=settings.device)
    notice = (f"Serving {embedded.describe()} because no official weights were available offline. It shows "
              f"the pipeline, not DINOv2's quality; {_official_hint(spec.model)}.")
    m = ServedModel(name=embedded.EMBEDDED_NAME, backbone=backbone, kind="fallback", notice=notice,
                    source="embedded model shipped with dinolab (see its MODEL_CARD.md)",
                    short_side=spec.short_side or embedded.SHORT_SIDE, model_id=embedded.EMBEDDED_NAME)
    m.seg_head = load_seg_head(str(embedded.embedded_seg_head_path()), backbone)
    m.depth_head = load_depth_head(str(embedded.embedded_depth_head_path()), backbone)
    return m


def _trained_fallback(spec: ModelSpec, settings: ServeSettings, progress: bool) -> ServedModel:
    from dinolab.models import load_model
    from dinolab.serve.fallback import FALLBACK_NAME, SERVE_SHORT_SIDE, ensure_fallback, fallback_config

    path = ensure_fallback(device=settings.device, progress=progress)
    cfg = fallback_config()
    steps = cfg.train.epochs * cfg.train.iters_per_epoch
    backbone = load_model(path, device=settings.device)
    what = (f"dinolab's fallback model: a ViT with patch {backbone.patch_size}, {len(backbone.blocks)} "
            f"blocks, pretrained here for {steps} steps on scikit-image's sample photos")
    notice = (f"Serving {what} (no official weights were available offline). It shows the pipeline, "
              f"not DINOv2's quality; {_official_hint(spec.model)}.")
    return ServedModel(name=FALLBACK_NAME, backbone=backbone, source="self-pretrained fallback (--fallback train)",
                       kind="fallback", short_side=spec.short_side or SERVE_SHORT_SIDE, notice=notice,
                       model_id=str(path))


def _load_spec(spec: ModelSpec, settings: ServeSettings, progress: bool) -> ServedModel:
    from dinolab.models import load_model
    from dinolab.models.variants import is_variant_name

    is_name = is_variant_name(spec.model)
    try:
        backbone = load_model(spec.model, weights=spec.weights, arch=spec.arch, sha256=spec.sha256,
                              pretrained=not spec.random_init, device=settings.device)
    except WeightsNotFoundError as e:
        if not (settings.fallback != "off" and is_name and spec.weights is None):
            raise
        what = "the embedded model" if settings.fallback == "embedded" else "a self-pretrained fallback model"
        log.warning("%s; serving %s instead (--fallback off: stop here)", e, what)
        return _fallback_model(spec, settings, progress)
    if spec.random_init:
        kind, source = "random", f"{spec.model} with random weights (--random-init: a smoke test only)"
    elif is_name and spec.weights is None:
        kind, source = "official", f"official {spec.model} weights"
    else:
        kind, source = "checkpoint", spec.model + (f" with weights {spec.weights}" if spec.weights else "")
    name = spec.name or (spec.model if is_name else Path(spec.model).stem)
    return ServedModel(name=name, backbone=backbone, source=source, kind=kind,
                       short_side=spec.short_side or 0, model_id=spec.model)


def resolve_models(settings: ServeSettings, *, progress: bool = True) -> ModelRegistry:
    """Load every model (and head) the settings name, on ``settings.device`` (default: CUDA when
    available, else CPU); see the module docstring for the fallback."""
    import torch

    if settings.device is None:
        settings = settings.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
    served: list[ServedModel] = []
    for spec in settings.models:
        m = _load_spec(spec, settings, progress)
        if m.kind == "fallback" and any(s.kind == "fallback" for s in served):
            continue  # several official models missing: one fallback serves for all
        heads = [h for h in (spec.seg_head, spec.depth_head) if h]
        if m.kind == "fallback":
            if heads:
                log.warning("not loading heads %s: they belong to %s, not to the fallback model", heads,
                            spec.model)
        else:
            m.seg_head = load_seg_head(spec.seg_head, m.backbone) if spec.seg_head else None
            m.depth_head = load_depth_head(spec.depth_head, m.backbone) if spec.depth_head else None
        served.append(m)
    return ModelRegistry(served)
