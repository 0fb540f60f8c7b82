"""Sample photos bundled inside the scikit-image wheel, addressed by id (no file paths, no network).

The web page offers them as a gallery, the API takes ``gallery=<id>`` instead of an upload, and the
fallback model (:mod:`dinolab.serve.fallback`) is pretrained on them. Only ids in :data:`PHOTOS` are
accepted, so nothing a client sends ever becomes a path.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

# id -> caption. All of these load from files inside the scikit-image package (no pooch download).
PHOTOS: dict[str, str] = {
    "astronaut": "Astronaut Eileen Collins",
    "chelsea": "Chelsea the cat",
    "coffee": "Cup of coffee",
    "rocket": "Falcon 9 rocket",
    "motorcycle_left": "Motorcycle (left view)",
    "motorcycle_right": "Motorcycle (right view)",
    "camera": "Cameraman (greyscale)",
    "coins": "Greek coins (greyscale)",
    "hubble_deep_field": "Hubble deep field",
    "immunohistochemistry": "Immunohistochemistry stain",
    "retina": "Human retina",
    "horse": "Horse silhouette",
    "brick": "Brick wall (texture)",
    "grass": "Grass (texture)",
    "gravel": "Gravel (texture)",
    "moon": "Moon surface (greyscale)",
}


def _array(photo_id: str) -> np.ndarray:
    from skimage import data

    if photo_id.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if photo_id == "motorcycle_left" else right
    return getattr(data, photo_id)()


@functools.lru_cache(maxsize=len(PHOTOS))
def load_photo(photo_id: str) -> Image.Image:
    """The RGB ``PIL.Image`` of a gallery photo; ``KeyError`` naming the valid ids for any other id.

    Cached: callers must not modify the returned image (copy it first).
    """
    if photo_id not in PHOTOS:
        raise KeyError(f"unknown gallery id {photo_id!r}; valid ids: {', '.join(PHOTOS)}")
    a = _array(photo_id)
    if a.dtype == bool:  # the horse silhouette is a boolean mask
        a = np.where(a, 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    return img.convert("RGB")


def gallery_list() -> list[dict[str, Any]]:
    """``[{"id", "title", "width", "height"}]`` for every gallery photo, in :data:`PHOTOS` order."""
    out = []
    for pid, title in PHOTOS.items():
        img = load_photo(pid)
        out.append({"id": pid, "title": title, "width": img.width, "height": img.height})
    return out
