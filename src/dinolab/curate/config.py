"""Typed options of ``dinolab curate``: one dataclass per stage, read from a small YAML file (a packaged
preset under ``dinolab/configs/curate/`` or a path) plus ``section.key=value`` overrides.

Unknown keys and wrongly typed values are refused with the list of valid keys. Every field has a
default, so an empty file (or none) is a valid configuration once ``embeddings`` or ``images`` is set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from dinolab.config import _build, _check_keys
from dinolab.errors import DinolabError

__all__ = ["STAGES", "ClusterOptions", "CurateConfig", "DedupOptions", "EmbedOptions", "SampleOptions", "SelectOptions",
           "config_to_dict", "list_curate_presets", "load_curate_config"]


STAGES = ("dedup", "select", "cluster", "sample")  # in pipeline order, after the embedding


@dataclass
class EmbedOptions:
    """How ``images`` are embedded when the run starts from images (model flags come from the CLI)."""

    resize: int = 256
    crop: int = 224
    batch_size: int = 64
    num_workers: int | None = None
    shard_size: int = 4096


@dataclass
class DedupOptions:
    """Near-duplicate removal (``curate.dedup``) and removal of near-copies of evaluation sets."""

    enabled: bool = True
    threshold: float = 0.95  # cosine similarity at or above which two images are copies
    k: int = 16  # neighbours searched per image
    method: Literal["exact", "cluster", "ivf", "hnsw"] = "exact"
    nlist: int | None = None  # cluster / IVF cells (default sqrt(N) / ~4 sqrt(N))
    nprobe: int | None = None  # cells searched per image (default: 1 for cluster, 16 for ivf)
    eval: tuple[str, ...] = ()  # embed folders of evaluation sets (same model) to protect
    eval_threshold: float | None = None  # default: threshold
    examples: int = 8  # duplicate pairs drawn in duplicates.png


@dataclass
class SelectOptions:
    """Retrieval-based selection (``curate.selection``); runs when ``seeds`` is set (unless disabled)."""

    enabled: bool | None = None  # None: when seeds are given
    seeds: str | None = None  # embed folder of the seed (curated) images
    mode: Literal["auto", "sample", "cluster"] = "auto"
    k: int = 4
    min_similarity: float | None = None
    n_clusters: int | None = None  # cluster mode; default round(sqrt(N))
    per_cluster: int | None = None  # cluster mode: at most this many images per kept cluster
    min_hits: int = 1
    index: Literal["exact", "flat", "ivf", "hnsw", "ivfpq"] = "exact"


@dataclass
class ClusterOptions:
    """Hierarchical k-means (``curate.kmeans``); ``ks`` finest level first, default two levels
    (round(sqrt(N)), round(N^(1/4)))."""

    enabled: bool = True
    ks: tuple[int, ...] | None = None
    n_iter: int = 20
    backend: Literal["torch", "faiss"] = "torch"
    spherical: bool = False


@dataclass
class SampleOptions:
    """Balanced hierarchical sampling (``curate.sampling``); skipped while ``n`` is unset."""

    enabled: bool = True
    n: int | None = None
    strategy: Literal["random", "closest"] = "random"


@dataclass
class CurateConfig:
    """The whole pipeline: pool, run folder, seed and device, then one section per stage."""

    out: str = "runs/curate"
    embeddings: str | None = None  # a finished `dinolab embed` folder (the pool)
    images: str | None = None  # or images to embed first (folder or list file) into <out>/embed
    images_root: str | None = None  # folder the pool ids are relative to (default: recorded by embed)
    key: Literal["cls", "patch_mean"] = "cls"
    seed: int = 0
    device: str | None = None
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    dedup: DedupOptions = field(default_factory=DedupOptions)
    select: SelectOptions = field(default_factory=SelectOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    sample: SampleOptions = field(default_factory=SampleOptions)


def list_curate_presets() -> list[str]:
    """Names of the packaged curation presets."""
    folder = resources.files("dinolab") / "configs" / "curate"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(source: str | os.PathLike | None) -> dict[str, Any]:
    if source is None:
        return {}
    if str(source) in list_curate_presets():
        text, label = (resources.files("dinolab") / "configs" / "curate" / f"{source}.yaml").read_text(), str(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DinolabError(f"no curate preset or file named {source!r}; presets: "
                               f"{', '.join(list_curate_presets())}; or give the path of a .yaml file")
        text, label = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DinolabError(f"{label} is not valid YAML: {e}") from None
    if not isinstance(data, dict | None):
        raise DinolabError(f"{label} must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def _set(raw: dict[str, Any], dotted: str, value: Any, item: str) -> None:
    """Put ``value`` at ``a.b`` in the raw mapping; the key path is checked against the schema."""
    parts = dotted.strip().split(".")
    if not all(parts):
        raise DinolabError(f"{item!r} is not of the form section.key=value (e.g. dedup.threshold=0.9)")
    cls: Any = CurateConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise DinolabError(f"{'.'.join(parts[:i])!r} is a value, it has no key {part!r}")
        _check_keys(cls, [part], ".".join(parts[:i]))
        cls = get_type_hints(cls)[part]
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DinolabError(f"cannot apply {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_curate_config(source: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                       values: dict[str, Any] | None = None) -> CurateConfig:
    """``CurateConfig`` from a preset name or YAML path (None: the defaults), then ``a.b=value`` overrides
    (values parsed as YAML), then ``values`` (``{"a.b": python value}``, e.g. from command-line flags)."""
    raw = _read(source)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise DinolabError(f"override {item!r} is not of the form section.key=value (e.g. dedup.threshold=0.9)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DinolabError(f"override {item!r}: the value is not valid YAML: {e}") from None
        _set(raw, key, value, item)
    for key, value in (values or {}).items():
        _set(raw, key, value, key)
    return _build(CurateConfig, raw, "")


def config_to_dict(cfg: CurateConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for YAML / JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v
    return plain(dataclasses.asdict(cfg))
