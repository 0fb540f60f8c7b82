"""Settings of ``dinolab serve``: a small YAML file (``--config serve.yaml``) and/or command-line flags.

Example ``serve.yaml`` (every key optional; unknown keys are refused with the list of valid ones)::

    host: 127.0.0.1
    port: 8000
    models:                         # the first one is the default; the page offers all of them
      - model: dinov2_vits14        # an official name (downloaded once, cached) ...
        seg_head: ade20k_linear     # optional: an official head name or a head checkpoint
        depth_head: runs/depth/head.pth
      - name: mine
        model: runs/pretrain/teacher_backbone.pth   # ... or a checkpoint of our training
        short_side: 224             # inference resolution (default 32 patches)
    index: idx/                     # `dinolab index build` folder for /v1/search
    images_root: photos/            # where the indexed ids are (thumbnails on the page)
    fallback: true                  # offline without weights: serve the self-pretrained model
    limits: {max_upload_mb: 20, max_pixels: 40000000, timeout_s: 120}

Relative paths in the file are read relative to the file's folder when something exists there.
Flags override the file (``--model``/``--weights``/``--seg-head``... change the first model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dinolab.errors import DinolabError


class ModelSpec(BaseModel):
    """One served backbone (and its optional heads)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="id in the API and on the page (default: from `model`)")
    model: str = Field("dinov2_vits14", description="variant name or checkpoint path / HF folder")
    weights: str | None = Field(None, description="weights file for a named variant")
    arch: str | None = Field(None, description="architecture of a checkpoint path (default: inferred)")
    sha256: str | None = None
    random_init: bool = Field(False, description="random weights (smoke tests only)")
    seg_head: str | None = Field(None, description="segmentation head: official name or checkpoint")
    depth_head: str | None = Field(None, description="depth head checkpoint")
    short_side: int | None = Field(None, ge=8, le=2048, description="inference short side, px "
                                   "(default: 32 patches; the fallback model: 160)")


class Limits(BaseModel):
    """Guards on uploads and on the work one request may cause."""

    model_config = ConfigDict(extra="forbid")

    max_upload_mb: float = Field(20.0, gt=0, description="largest accepted upload per image, MiB")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted width x height")
    min_side: int = Field(16, ge=1, description="smallest accepted side, px")
    timeout_s: float = Field(120.0, gt=0, description="a request taking longer gets 504")
    max_queue: int = Field(32, ge=1, description="model jobs waiting at once; more get 503")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send complete request headers "
                                    "within this many seconds (of connecting, or of its previous response)")
    body_timeout_s: float = Field(60.0, gt=0, description="a request body not received within this many "
                                  "seconds of its headers gets 408")
    max_requests: int | None = Field(None, ge=1, description="requests in progress at once (uploads being "
                                     "read included); more get 503; /healthz is never refused "
                                     "(default 2 x max_queue + 16)")
    max_connections: int = Field(512, ge=1, description="open connections at once; more are refused")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def requests_in_progress(self) -> int:
        """``max_requests``, or its default."""
        return self.max_requests or 2 * self.max_queue + 16


class ServeSettings(BaseModel):
    """Everything ``dinolab serve`` reads; see the module docstring for the YAML form."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda when available)")
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec()], min_length=1)
    index: str | None = Field(None, description="`dinolab index build` folder for /v1/search")
    images_root: str | None = Field(None, description="folder the indexed ids are relative to")
    index_resize: int | None = Field(None, ge=8, description="query transform: resize short side (default: "
                                     "what the index was embedded with, else 256)")
    index_crop: int | None = Field(None, ge=8, description="query transform: centre crop (default: what the "
                                   "index was embedded with, else 224)")
    fallback: bool = Field(True, description="without official weights, serve the self-pretrained model")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host header names accepted "
                                     "besides localhost, 127.0.0.1, ::1 and `host` ('*.example.com' "
                                     "patterns, '*': any)")
    allowed_origins: list[str] = Field(default_factory=list, description="origins (scheme://host[:port]) "
                                       "whose pages may POST here besides the server's own ('*': any)")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            if "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*.")):
                raise ValueError(f"{h!r}: a wildcard host must look like '*.example.com' (or be '*')")
        return hosts


def _relative_to(folder: Path, value: Any) -> Any:
    """A relative path string resolved against ``folder`` when it exists there, else unchanged."""
    if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
        return str(folder / value)
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DinolabError(f"serve config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DinolabError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise DinolabError(f"{path} must hold a mapping (host:, port:, models: ...), got "
                           f"{type(data).__name__}")
    folder = path.parent
    for key in ("index", "images_root"):
        data[key] = _relative_to(folder, data.get(key))
    for spec in data.get("models") or []:
        if isinstance(spec, dict):
            for key in ("model", "weights", "seg_head", "depth_head"):
                if key in spec:
                    spec[key] = _relative_to(folder, spec[key])
    return {k: v for k, v in data.items() if v is not None}


def _explain(e: ValidationError, label: str) -> str:
    """One line per problem: ``models.0.modle: Extra inputs are not permitted (valid keys: ...)``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            owner = {"models": ModelSpec, "limits": Limits}.get(str(err["loc"][0]), ServeSettings)
            if len(err["loc"]) == 1:
                owner = ServeSettings
            msg = f"unknown key (valid keys: {', '.join(owner.model_fields)})"
        parts.append(f"{loc}: {msg}")
    return f"{label}: " + "; ".join(parts)


def load_settings(config: str | os.PathLike | None = None, **flags: Any) -> ServeSettings:
    """Settings from an optional YAML file, then flags (None values are ignored).

    Flags: any top-level key (``host``, ``port``, ``index`` ...), the model keys ``model``, ``weights``,
    ``arch``, ``sha256``, ``random_init``, ``seg_head``, ``depth_head``, ``short_side`` (applied to the
    first model), and the limit keys (``max_upload_mb``, ``max_pixels``, ``timeout_s``, ``max_queue``).
    """
    data: dict[str, Any] = _read_yaml(Path(config)) if config else {}
    label = str(config) if config else "serve settings"
    flags = {k: v for k, v in flags.items() if v is not None}
    model_keys = set(ModelSpec.model_fields) - {"name"}
    model_flags = {k: flags.pop(k) for k in list(flags) if k in model_keys}
    limit_flags = {k: flags.pop(k) for k in list(flags) if k in Limits.model_fields}
    unknown = set(flags) - set(ServeSettings.model_fields)
    if unknown:
        raise DinolabError(f"unknown serve settings {sorted(unknown)}")
    data.update(flags)
    if model_flags:
        models = list(data.get("models") or [{}])
        first = dict(models[0]) if isinstance(models[0], dict) else {}
        if "model" in model_flags and model_flags["model"] != first.get("model"):
            first = {k: v for k, v in first.items() if k == "short_side"}  # a new model: drop heads, name
        models[0] = {**first, **model_flags}
        data["models"] = models
    if limit_flags:
        limits = data.get("limits") if isinstance(data.get("limits"), dict) else {}
        data["limits"] = {**limits, **limit_flags}
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as e:
        raise DinolabError(_explain(e, label)) from None
