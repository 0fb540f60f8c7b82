"""The released DINOv2 depth heads by name: ``dinov2_vit{s,b,l,g}14_{nyu,kitti}_{linear,linear4,dpt}``.

Parses the names, and finds the file (``<backbone>/<name>_head.pth`` under the release's base URL,
``models.checkpoints.OFFICIAL_BASE_URL`` or ``$DINOLAB_WEIGHTS_MIRROR``) in the weights cache or
torch.hub's cache, or downloads it once with the backbones' checked downloader.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dinolab.errors import WeightsNotFoundError
from dinolab.models.checkpoints import OFFICIAL_BASE_URL

_OFFICIAL_NAME = re.compile(r"^(dinov2_vit[sblg]14)_(nyu|kitti)_(linear4|linear|dpt)(?:_head)?(?:\.pth)?$")
_OFFICIAL_DEPTHS = {"s": 12, "b": 12, "l": 24, "g": 40}
OFFICIAL_MAX_DEPTH = {"nyu": 10.0, "kitti": 80.0}


@dataclass(frozen=True)
class OfficialHeadName:
    """A parsed ``dinov2_vits14_nyu_linear4``-style name."""

    backbone: str
    dataset: str
    kind: str

    @property
    def filename(self) -> str:
        return f"{self.backbone}_{self.dataset}_{self.kind}_head.pth"

    @property
    def url(self) -> str:
        mirror = os.environ.get("DINOLAB_WEIGHTS_MIRROR")
        return f"{(mirror or OFFICIAL_BASE_URL).rstrip('/')}/{self.backbone}/{self.filename}"

    @property
    def depth(self) -> int:
        return _OFFICIAL_DEPTHS[self.backbone[len("dinov2_vit")]]


def parse_official_name(name: str | os.PathLike) -> OfficialHeadName | None:
    """``dinov2_vitb14_kitti_dpt`` (or ``..._head.pth``, or a path ending so) -> its parts; else None."""
    m = _OFFICIAL_NAME.match(Path(name).name)
    return OfficialHeadName(*m.groups()) if m else None


def resolve_official_head(name: OfficialHeadName, *, sha256: str | None = None, progress: bool = True) -> Path:
    """The released head file: from the weights cache, torch.hub's cache, or downloaded once."""
    from dinolab.models.checkpoints import cache_dir, download_weights, verify_file

    dest = cache_dir() / name.filename
    for path in (dest, Path(torch.hub.get_dir()) / "checkpoints" / name.filename):
        if path.is_file():
            verify_file(path, sha256)
            return path
    if not os.environ.get("DINOLAB_OFFLINE"):
        try:
            return download_weights(name.url, dest, sha256, progress)
        except OSError as e:
            reason = getattr(e, "reason", e)
            raise WeightsNotFoundError(f"{name.filename}: not cached and download failed ({reason}); download "
                                       f"{name.url} to {dest} (or pass --head /path/to/{name.filename})") from None
    raise WeightsNotFoundError(f"{name.filename}: not cached (offline); download {name.url} to {dest}")
