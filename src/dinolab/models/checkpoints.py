"""Weights: find, download (once, to a cache, SHA-256 checked), read safely, load, save.

Sources ``load_model`` accepts:
- a name from the variant table (``dinov2_vits14``, ``vit_small_patch14_dinov2`` ...): the official
  ``.pth`` from the cache, from torch.hub's cache, or downloaded from Meta's URL (or a mirror set by
  ``DINOLAB_WEIGHTS_MIRROR``);
- a path to a ``.pth`` / ``.pt`` / ``.safetensors`` file in the official, HuggingFace or timm layout,
  or to a HuggingFace ``facebook/dinov2-*`` folder (``config.json`` + ``model.safetensors``).

Nothing is unpickled beyond tensors: ``torch.load(weights_only=True)`` or safetensors.
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
from dinolab.io import atomic_write, atomic_write_text
from dinolab.models.convert import StateDict, to_official
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

    The bytes go to a temp file in the same folder and are hashed on the way; only a complete file
    with the right checksum is renamed into place, so an interrupted download never looks cached.
    """
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:  # fd closed on any error
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
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
        from safetensors.torch import load_file

        sd = {k: v for f in files for k, v in load_file(f).items()}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (pickles with code, truncated zips, ...)
            raise DinolabError(f"cannot read {path} as a tensors-only checkpoint: {e}".splitlines()[0]) from None
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
    return Variant(  # own model: DINOv2 uses 64-dim heads everywhere; explicit-size pos-embed resizing
        name=f"custom_vit_d{dim}_l{depth}_p{patch}", embed_dim=dim, depth=depth,
        num_heads=num_heads or max(1, dim // 64), patch_size=patch, img_size=grid * patch,
        ffn="swiglu" if swiglu else "mlp", ffn_hidden=hidden, num_register_tokens=regs,
        interpolate_offset=0.0, interpolate_antialias=True, layerscale=layerscale)


def _sidecar_variant(path: Path) -> Variant | None:
    """Architecture saved by ``save_official`` next to the weights (``<file>.json``)."""
    meta = path.with_name(path.name + ".json")
    if not path.is_file() or not meta.exists():
        return None
    return Variant(**{k: tuple(v) if k == "aliases" else v for k, v in json.loads(meta.read_text()).items()})


def load_model(name_or_path: str | Path, *, weights: str | Path | None = None, arch: str | None = None,
               pretrained: bool = True, sha256: str | None = None, num_heads: int | None = None,
               device: str | torch.device | None = None, progress: bool = True,
               **overrides: Any) -> DinoVisionTransformer:
    """Build a backbone and load its weights (``strict=True``); returned in eval mode.

    Args:
        name_or_path: a variant name (official, timm or own) or a checkpoint path / HF folder.
        weights: weights file for a named variant instead of the cached/downloaded official one.
        arch: variant name whose architecture a checkpoint path has (default: inferred).
        pretrained: with a name, ``False`` gives random weights (same as ``create_model``).
        sha256: expected SHA-256 of the weights file.
        num_heads: heads of a checkpoint whose shapes do not say (default: embed_dim / 64).
        overrides: variant fields to change (e.g. ``img_size``) before building.
    """
    name = str(name_or_path)
    is_name = is_variant_name(name)
    if is_name and weights is None and not pretrained:
        variant, sd = get_variant(name, **overrides), None
    elif is_name:
        variant = get_variant(name, **overrides)
        path = Path(weights) if weights else resolve_weights(variant, sha256=sha256, progress=progress)
        if weights:
            verify_file(path, sha256)
        sd = read_state_dict(path)
    else:
        path = Path(name)
        if path.is_file():
            verify_file(path, sha256)
        sd = read_state_dict(path)
        variant = (get_variant(arch, **overrides) if arch else
                   _sidecar_variant(path) or _hf_variant(path, sd) or infer_variant(sd, num_heads))
    if sd is not None and (variant.layerscale is None) == any(k.endswith(".ls1.gamma") for k in sd):
        # weights of a model trained without LayerScale (model.layerscale=null), or the reverse
        variant = replace(variant, layerscale=None if variant.layerscale is not None else 1e-5)
    model = DinoVisionTransformer(**variant.model_kwargs())
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise DinolabError(f"weights do not fit {variant.name}: {str(e).splitlines()[1].strip()}") from None
    log.info("loaded %s (%s)", variant.name, "pretrained" if sd is not None else "random init")
    return model.to(device).eval() if device else model.eval()


def _hf_variant(path: Path, sd: StateDict) -> Variant | None:
    """Architecture from a HuggingFace folder's ``config.json`` (heads are not in the shapes)."""
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.exists():
        return None
    cfg = json.loads(cfg_file.read_text())
    return infer_variant(sd, num_heads=cfg.get("num_attention_heads"))


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
    that ``transformers.Dinov2Model.from_pretrained(folder)`` (or ``...WithRegisters...``) loads."""
    from dinolab.models.convert import hf_config, official_to_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in official_to_hf(model.state_dict()).items()}
    from safetensors.torch import save

    atomic_write(folder / "model.safetensors", lambda f: f.write(save(sd, metadata={"format": "pt"})))
    variant = infer_variant(model.state_dict(), num_heads=model.num_heads)
    atomic_write_text(folder / "config.json", json.dumps(hf_config(variant), indent=1))
    return folder
