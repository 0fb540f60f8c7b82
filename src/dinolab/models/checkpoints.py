"""Weights: find, download (once, to a cache, SHA-256 checked), read safely, load, save.

Sources ``load_model`` accepts:
- a name from the variant table (``dinov2_vits14``, ``vit_small_patch14_dinov2`` ...): the official
  ``.pth`` from the cache, from torch.hub's cache, or downloaded from Meta's URL (or a mirror set by
  ``DINOLAB_WEIGHTS_MIRROR``);
- a path to a ``.pth`` / ``.pt`` / ``.safetensors`` file in the official, HuggingFace or timm layout,
  or to a HuggingFace ``facebook/dinov2-*`` folder (``config.json`` + ``model.safetensors``).

Nothing is unpickled beyond data: every ``.pth`` / ``.pt`` / pickle file the project reads goes
through ``safe_torch_load`` or ``safe_pickle_load`` (``dinolab.models.safe_load``, re-exported here),
which allow tensors, containers, plain values and numpy arrays/dtypes/scalars, nothing else.
Meta publishes no checksums for its files, so the SHA-256 of a file is recorded next to it at
first download (``<file>.sha256``) and checked on every later load; pass ``sha256=`` to pin one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinolab.errors import ChecksumError, DinolabError, WeightsNotFoundError
from dinolab.io import atomic_write, atomic_write_text, read_json_object
from dinolab.models import embedded
from dinolab.models.convert import StateDict, to_official
from dinolab.models.safe_load import (  # noqa: F401  (re-exported: the one safe reader)
    UnsafeFileError,
    numpy_data_globals,
    safe_pickle_load,
    safe_torch_load,
)
from dinolab.models.variants import VARIANTS, Variant, get_variant, is_variant_name
from dinolab.models.vit import DinoVisionTransformer

log = logging.getLogger(__name__)
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
def cache_dir() -> Path:
    """Where downloaded weights live: ``$DINOLAB_CACHE`` or ``~/.cache/dinolab``, then ``/weights``."""
    return Path(os.environ.get("DINOLAB_CACHE", Path.home() / ".cache" / "dinolab")) / "weights"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, sha256: str | None = None) -> None:
    """Check ``path`` against ``sha256`` or, if none is given, against its recorded ``.sha256``."""
    record = path.with_name(path.name + ".sha256")
    expected = sha256 or (record.read_text().split()[0] if record.exists() else None)
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path} has SHA-256 {actual[:16]}..., expected {expected[:16]}...; the file is "
                            f"corrupt or not the one expected: delete it to download it again")


def download_weights(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` (http(s) or file) to ``dest`` atomically; refuse it if ``sha256`` mismatches.

    The bytes go to a temp file in the same folder and are hashed on the way. Only a complete file
    (as many bytes as the server's Content-Length) that reads as a checkpoint (``safe_torch_load``,
    or a safetensors header) and has the right checksum is renamed into place and gets its
    ``.sha256`` recorded; anything else (a cut transfer, an HTML error page served with status 200,
    a pickle with code) raises ``DinolabError`` and leaves nothing in the cache.
    """
    import http.client

    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:  # fd closed on any error
            total = int(r.headers.get("Content-Length") or 0) or None
            kind = r.headers.get("Content-Type") or ""
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                try:
                    while block := r.read(1 << 20):
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
                except http.client.IncompleteRead as e:
                    raise DinolabError(f"download of {url} was cut off ({e}); nothing was cached, "
                                       "try again") from None
        _check_download(Path(tmp), url, total, kind)
        digest = h.hexdigest()
        if sha256 and digest != sha256.lower():
            raise ChecksumError(f"download of {url} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...; "
                                "refusing it (a corrupt transfer or a changed file)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write_text(dest.with_name(dest.name + ".sha256"), f"{digest}  {dest.name}\n")
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, digest)
    return dest


def _check_download(tmp: Path, url: str, total: int | None, content_type: str) -> None:
    """A downloaded file is complete and reads as weights, or ``DinolabError`` (nothing is cached)."""
    import zipfile

    size = tmp.stat().st_size
    if total is not None and size != total:
        raise DinolabError(f"download of {url} is incomplete: {size} of {total} bytes (Content-Length); "
                           "nothing was cached, try again")
    try:
        if url.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(tmp), "pt") as f:
                f.keys()
        else:  # a zip checkpoint is checked memory-mapped: its pickle is read, not its tensors
            safe_torch_load(tmp, mmap=zipfile.is_zipfile(tmp))
    except Exception as e:  # noqa: BLE001  (DinolabError, SafetensorError)
        what = f" (the server sent {content_type.split(';')[0]})" if content_type.startswith("text/") else ""
        raise DinolabError(f"download of {url} is not a weights file{what}: "
                           f"{str(e).splitlines()[0]}; nothing was cached") from None


def _weights_url(variant: Variant) -> str:
    mirror = os.environ.get("DINOLAB_WEIGHTS_MIRROR")
    return variant.url.replace(OFFICIAL_BASE_URL, mirror.rstrip("/")) if mirror else variant.url


def resolve_weights(variant: Variant, *, sha256: str | None = None, download: bool = True,
                    progress: bool = True) -> Path:
    """Path of the variant's official weights: cached, in torch.hub's cache, or freshly downloaded."""
    if variant.url is None:
        raise DinolabError(f"{variant.name} has no official weights; pass a checkpoint path instead")
    sha256 = sha256 or variant.sha256
    dest = cache_dir() / variant.filename
    hub = Path(torch.hub.get_dir()) / "checkpoints" / variant.filename
    for path in (dest, hub):
        if path.is_file():
            verify_file(path, sha256)
            return path
    url = _weights_url(variant)
    if download and not os.environ.get("DINOLAB_OFFLINE"):
        try:
            return download_weights(url, dest, sha256, progress)
        except OSError as e:  # URLError, timeouts, refused connections are all OSErrors
            reason = getattr(e, "reason", e)
            raise WeightsNotFoundError(
                f"{variant.name}: weights not cached and download failed ({reason}); download {url} "
                f"to {dest} (or pass --weights /path/to/{variant.filename})") from None
    raise WeightsNotFoundError(f"{variant.name}: weights not found offline; download {url} to {dest} "
                               f"(or pass --weights /path/to/{variant.filename})")


def read_safetensors(path: str | Path) -> StateDict:
    """The tensors of a ``.safetensors`` file; ``DinolabError`` naming it when its header or data is bad."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001  (SafetensorError: bad header, truncated data; OSError)
        raise DinolabError(f"cannot read {path} as a safetensors file: {str(e).splitlines()[0]}") from None


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a checkpoint file or HF folder, unwrapped and converted to official keys."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise DinolabError(f"{path} is a folder without *.safetensors files (expected a HuggingFace "
                               "facebook/dinov2-* snapshot)")
        sd = {k: v for f in files for k, v in read_safetensors(f).items()}
    elif path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:
        sd = safe_torch_load(path)
    if not isinstance(sd, dict):
        raise DinolabError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    try:
        return to_official(_unwrap(sd))
    except (ValueError, KeyError) as e:  # unknown layout, or a layout missing a key it needs
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise DinolabError(f"{path} is not a DINOv2 backbone checkpoint: {detail}".splitlines()[0]) from None


def _unwrap(sd: dict[str, Any]) -> StateDict:
    """Accept training checkpoints: take the teacher (or model) and strip wrapper prefixes."""
    for key in ("teacher", "model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # teacher with heads: keep the backbone
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def infer_variant(sd: StateDict, num_heads: int | None = None) -> Variant:
    """Architecture from official-layout tensor shapes; an official variant if the shapes match one."""
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    layerscale = 1e-5 if "blocks.0.ls1.gamma" in sd else None
    for v in VARIANTS.values():
        if v.url and (v.embed_dim, v.depth, v.num_register_tokens, v.patch_size, v.img_size // 14) == (
                dim, depth, regs, patch, grid) and (num_heads in (None, v.num_heads)) and layerscale:
            return v
    # no official variant: DINOv2 uses 64-dim heads everywhere; the position-embedding resizing rule of
    # the official models of the same kind: with registers explicit-size + antialias (offset 0), without
    # them the official default (offset 0.1, bicubic, no antialias)
    return Variant(
        name=f"custom_vit_d{dim}_l{depth}_p{patch}", embed_dim=dim, depth=depth,
        num_heads=num_heads or max(1, dim // 64), patch_size=patch, img_size=grid * patch,
        ffn="swiglu" if swiglu else "mlp", ffn_hidden=hidden, num_register_tokens=regs,
        interpolate_offset=0.0 if regs else 0.1, interpolate_antialias=bool(regs), layerscale=layerscale)


# sidecar field -> accepted types (bool is an int in Python: refused where a number is meant)
_SIDECAR_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "embed_dim": (int,), "depth": (int,), "num_heads": (int,), "patch_size": (int,),
    "img_size": (int,), "ffn": (str,), "ffn_hidden": (int,), "num_register_tokens": (int,),
    "interpolate_offset": (int, float), "interpolate_antialias": (bool,),
    "layerscale": (int, float, type(None)), "url": (str, type(None)), "sha256": (str, type(None)),
    "aliases": (list, tuple),
}


def _sidecar_variant(path: Path) -> Variant | None:
    """Architecture saved by ``save_official`` next to the weights (``<file>.json``), checked field
    by field; ``DinolabError`` naming the sidecar when it is not valid JSON or a field is wrong."""
    meta = path.with_name(path.name + ".json")
    if not path.is_file() or not meta.exists():
        return None
    d = read_json_object(meta)
    unknown = sorted(set(d) - set(_SIDECAR_TYPES))
    missing = sorted({"name", "embed_dim", "depth", "num_heads"} - set(d))
    wrong = [f"{k}={d[k]!r}" for k, types in _SIDECAR_TYPES.items() if k in d and (
        not isinstance(d[k], types) or (isinstance(d[k], bool) and bool not in types))]
    wrong += [f"{k}={d[k]!r}" for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size")
              if isinstance(d.get(k), int) and not isinstance(d[k], bool) and d[k] < 1]
    if "ffn" in d and d["ffn"] not in ("mlp", "swiglu"):
        wrong.append(f"ffn={d['ffn']!r} (mlp or swiglu)")
    if unknown or missing or wrong:
        problems = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing) + \
                   [f"wrong values {wrong}"] * bool(wrong)
        raise DinolabError(f"{meta} is not a valid architecture sidecar: {'; '.join(problems)} "
                           f"(delete it to infer the architecture from the weights)")
    return Variant(**{k: tuple(v) if k == "aliases" else v for k, v in d.items()})


def _arch_of_path(path: Path, sd: StateDict, arch: str | None, num_heads: int | None,
                  overrides: dict[str, Any]) -> tuple[Variant, str]:
    """(variant, where its position-embedding rule comes from) for a checkpoint given by path."""
    if arch:
        return get_variant(arch, **overrides), f"the variant {arch}"
    variant = _sidecar_variant(path)
    if variant is not None:
        return variant, f"its sidecar {path.name}.json"
    try:
        variant = _hf_variant(path, sd) or infer_variant(sd, num_heads)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise DinolabError(f"{path}: cannot infer the architecture from its tensor shapes ({e})") from None
    if variant.url:
        return variant, f"the official {variant.name}"
    kind = "register tokens: the register models'" if variant.num_register_tokens else \
        "no register tokens: the official default"
    return variant, f"{kind} rule (no sidecar, shapes match no official variant)"


def _build(variant: Variant, source: str) -> DinoVisionTransformer:
    """The model of ``variant``, checked on the meta device first so that shapes no architecture
    has (width not divisible by the heads, absurd sizes) give one ``DinolabError`` naming ``source``
    instead of a constructor's ValueError or an enormous allocation."""
    try:
        with torch.device("meta"):
            DinoVisionTransformer(**variant.model_kwargs())
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        raise DinolabError(f"{source}: no model can be built with this architecture ({variant.name}: "
                           f"embed_dim {variant.embed_dim}, {variant.num_heads} heads, depth {variant.depth}, "
                           f"patch {variant.patch_size}): {str(e).splitlines()[0]}"
                           + ("; the heads were guessed as embed_dim / 64: pass num_heads= or a .json sidecar"
                              if variant.name.startswith("custom_") else "")) from None
    return DinoVisionTransformer(**variant.model_kwargs())


def _check_shapes(model_sd: dict[str, Tensor], sd: StateDict, variant: Variant, source: str) -> None:
    """The weights fit ``variant`` key by key and shape by shape (``DinolabError`` otherwise)."""
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in model_sd.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = (f"size mismatch for {wrong[0]}" if wrong else
                  f"Missing key(s) {missing[:3]}" if missing else f"Unexpected key(s) {unexpected[:3]}")
        raise DinolabError(f"weights of {source} do not fit {variant.name}: {detail}")


def load_model(name_or_path: str | Path, *, weights: str | Path | None = None, arch: str | None = None,
               pretrained: bool = True, sha256: str | None = None, num_heads: int | None = None,
               device: str | torch.device | None = None, progress: bool = True,
               **overrides: Any) -> DinoVisionTransformer:
    """Build a backbone and load its weights (``strict=True``); returned in eval mode.

    Args:
        name_or_path: a variant name (official, timm or own) or a checkpoint path / HF folder.
        weights: weights file for a named variant instead of the cached/downloaded official one.
        arch: variant name whose architecture a checkpoint path has (default: its ``.json``
            sidecar, else inferred from the shapes; the position-embedding resizing rule then
            follows the official models: with registers offset 0 + antialias, without offset 0.1).
        pretrained: with a name, ``False`` gives random weights (same as ``create_model``).
        sha256: expected SHA-256 of the weights file.
        num_heads: heads of a checkpoint whose shapes do not say (default: embed_dim / 64).
        overrides: variant fields to change (e.g. ``img_size``) before building.

    Raises ``DinolabError`` (one line, naming the file) when the file is unreadable, unsafe, or its
    shapes fit no architecture.
    """
    name = str(name_or_path)
    if name == embedded.EMBEDDED_NAME:  # the model shipped in the package, checked against model.json
        name, sha256 = str(embedded.embedded_backbone_path()), embedded.backbone_sha256()
    is_name = is_variant_name(name)
    path, sd = None, None
    if is_name:
        variant, rule = get_variant(name, **overrides), f"the variant {name}"
        if weights is not None or pretrained:
            path = Path(weights) if weights else resolve_weights(variant, sha256=sha256, progress=progress)
            if weights:
                verify_file(path, sha256)
            sd = read_state_dict(path)
    else:
        path = Path(name)
        if path.is_file():
            verify_file(path, sha256)
        sd = read_state_dict(path)
        variant, rule = _arch_of_path(path, sd, arch, num_heads, overrides)
    if sd is not None and (variant.layerscale is None) == any(k.endswith(".ls1.gamma") for k in sd):
        # weights of a model trained without LayerScale (model.layerscale=null), or the reverse
        variant = replace(variant, layerscale=None if variant.layerscale is not None else 1e-5)
    source = str(path) if path is not None else variant.name
    model = _build(variant, source)
    if sd is not None:
        _check_shapes(model.state_dict(), sd, variant, source)
        model.load_state_dict(sd, strict=True)
    log.info("loaded %s (%s); position embeddings resized with offset %g, antialias %s (from %s)",
             variant.name, "pretrained" if sd is not None else "random init", variant.interpolate_offset,
             variant.interpolate_antialias, rule)
    return model.to(device).eval() if device else model.eval()


def _hf_variant(path: Path, sd: StateDict) -> Variant | None:
    """Architecture from a HuggingFace folder's ``config.json`` (heads are not in the shapes)."""
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.exists():
        return None
    heads = read_json_object(cfg_file).get("num_attention_heads")
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
        raise DinolabError(f"{cfg_file}: num_attention_heads must be a positive integer, got {heads!r}")
    return infer_variant(sd, num_heads=heads)


def save_official(model: DinoVisionTransformer, path: str | Path, variant: Variant | None = None) -> Path:
    """Save the backbone in the official ``.pth`` layout (atomically), plus ``<file>.json`` with its
    architecture so ``load_model(path)`` rebuilds it exactly (official code ignores the sidecar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))
    variant = variant or infer_variant(sd, num_heads=model.num_heads)
    arch = {**variant.__dict__, "interpolate_offset": model.interpolate_offset,
            "interpolate_antialias": model.interpolate_antialias, "num_heads": model.num_heads}
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(arch, indent=1))
    return path


def save_hf_folder(model: DinoVisionTransformer, folder: str | Path) -> Path:
    """Save as a HuggingFace folder (``config.json`` + ``model.safetensors`` with the hub's key names)
    that ``transformers.Dinov2Model.from_pretrained(folder)`` (or ``...WithRegisters...``) loads.

    transformers resizes position embeddings to an explicit size (antialiased only for register
    models); a model whose own rule differs (the official no-register models: 0.1 offset) gives the
    same outputs there at its native size only. That is logged as a warning and recorded, with the
    sizes where the outputs match, in ``dinolab_export.json`` beside ``config.json``.
    """
    from dinolab.models.convert import hf_config, official_to_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in official_to_hf(model.state_dict()).items()}
    from safetensors.torch import save

    atomic_write(folder / "model.safetensors", lambda f: f.write(save(sd, metadata={"format": "pt"})))
    variant = infer_variant(model.state_dict(), num_heads=model.num_heads)
    atomic_write_text(folder / "config.json", json.dumps(hf_config(variant), indent=1))
    notes = hf_export_notes(model)
    if notes["outputs_match_transformers"] != "at every input size":
        log.warning("%s: transformers' %s gives the same outputs as this model %s; at other sizes it resizes "
                    "the position embeddings differently (see %s)", folder, notes["transformers_class"],
                    notes["outputs_match_transformers"], folder / "dinolab_export.json")
    atomic_write_text(folder / "dinolab_export.json", json.dumps(notes, indent=1))
    return folder


def hf_export_notes(model: DinoVisionTransformer) -> dict[str, Any]:
    """Where a ``save_hf_folder`` export matches transformers (recorded in ``dinolab_export.json``)."""
    regs = model.num_register_tokens > 0
    patch = model.patch_size
    side = math.isqrt(model.pos_embed.shape[1] - 1) * patch
    same = model.interpolate_offset == 0 and bool(model.interpolate_antialias) == regs
    return {
        "exported_by": "dinolab.models.save_hf_folder",
        "transformers_class": "Dinov2WithRegistersModel" if regs else "Dinov2Model",
        "native_size": [side, side], "patch_size": patch,
        "position_embedding_resize": {
            "dinolab": {"offset": model.interpolate_offset, "antialias": bool(model.interpolate_antialias)},
            "transformers": {"offset": 0.0, "antialias": regs}},
        "outputs_match_transformers": "at every input size" if same else
        f"at the native size {side}x{side} only",
    }
