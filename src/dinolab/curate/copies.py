"""Copy detection helpers: make augmented copies of real images, a hand-crafted copy descriptor,
and pair-level precision / recall of a duplicate finder.

``augment_copy`` applies the edits that near-duplicates on the web usually carry — a down- and
up-scale, a crop, JPEG re-compression, a colour shift — with parameters drawn from a seeded
numpy ``Generator``, and returns an image of the original size.

``pixel_features`` is a deterministic descriptor that stays close under those edits without any
network: each image is resized to ``size x size`` (area averaging), each colour channel is
standardised (zero mean, unit variance: brightness, contrast and per-channel colour shifts cancel),
and the vector is L2-normalised. It is the raw-pixel baseline of ``benchmarks/curate_cifar10.py``
and the feature the dedup tests run on.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from dinolab.errors import DinolabError

__all__ = ["OPS", "augment_copy", "pair_precision_recall", "pixel_features", "precision_recall_sweep"]

OPS = ("resize", "crop", "jpeg", "colour")


def _resize_down_up(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = rng.uniform(0.5, 0.8)
    small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.BICUBIC)


def _crop(img: Image.Image, rng: np.random.Generator, keep: tuple[float, float] = (0.85, 0.95)) -> Image.Image:
    frac = rng.uniform(*keep)  # side fraction kept: by default 72-90% of the area
    w, h = max(1, round(img.width * frac)), max(1, round(img.height * frac))
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    return img.crop((x, y, x + w, y + h)).resize(img.size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(20, 61)))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    shift = rng.integers(-20, 21, size=3)  # per-channel offset (a colour cast)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8))


_EDITS = {"resize": _resize_down_up, "crop": _crop, "jpeg": _jpeg, "colour": _colour}


def augment_copy(img: Image.Image | np.ndarray, rng: np.random.Generator,
                 ops: Sequence[str] = OPS, *, crop_keep: tuple[float, float] = (0.85, 0.95)) -> Image.Image:
    """An edited copy of ``img`` (RGB, same size): the ``ops`` in the order crop, resize, colour, jpeg.

    Parameters are drawn from ``rng``: crop keeps a side fraction in ``crop_keep`` at a random place;
    resize goes down to 50-80% and back up; colour changes brightness, contrast (x0.75-1.25) and
    saturation (x0.6-1.4) and adds a per-channel offset of up to +-20; JPEG quality 20-60.
    """
    if not 0 < crop_keep[0] <= crop_keep[1] <= 1:
        raise DinolabError(f"crop_keep must be a range within (0, 1], got {crop_keep}")
    unknown = set(ops) - set(OPS)
    if unknown:
        raise DinolabError(f"unknown copy edits {sorted(unknown)}; choose from {', '.join(OPS)}")
    out = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    out = out.convert("RGB")
    for op in ("crop", "resize", "colour", "jpeg"):  # JPEG last, as a re-upload would
        if op in ops:
            out = _crop(out, rng, crop_keep) if op == "crop" else _EDITS[op](out, rng)
    return out


def pixel_features(images: Iterable[Image.Image | np.ndarray], size: int = 16) -> np.ndarray:
    """(N, 3 size^2) float32 unit rows: area-resized pixels, each channel standardised per image."""
    if size < 1:
        raise DinolabError(f"size must be >= 1, got {size}")
    rows = []
    for img in images:
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        a = np.asarray(pil.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
        a = (a - a.mean(axis=(0, 1))) / (a.std(axis=(0, 1)) + 1e-6)  # (size, size, 3)
        v = a.ravel()
        rows.append(v / max(np.linalg.norm(v), 1e-12))
    if not rows:
        return np.zeros((0, 3 * size * size), np.float32)
    return np.stack(rows).astype(np.float32)


def _as_pair_set(pairs: Iterable[Sequence[int]] | np.ndarray) -> set[tuple[int, int]]:
    return {(min(int(a), int(b)), max(int(a), int(b))) for a, b in pairs}


def pair_precision_recall(found: Iterable[Sequence[int]] | np.ndarray,
                          true: Iterable[Sequence[int]] | np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of the unordered ``found`` pairs against the ``true`` pairs.

    Precision is 1.0 when nothing is found (no false claim); recall is NaN without true pairs.
    """
    f, t = _as_pair_set(found), _as_pair_set(true)
    hit = len(f & t)
    p = hit / len(f) if f else 1.0
    r = hit / len(t) if t else float("nan")
    f1 = 2 * p * r / (p + r) if t and (p + r) > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1, "found": len(f), "true": len(t), "correct": hit}


def precision_recall_sweep(pairs: np.ndarray, similarities: np.ndarray, true: Iterable[Sequence[int]],
                           thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Pair precision / recall at each threshold, from candidate ``pairs`` (P, 2) found at the lowest one
    with their cosine ``similarities`` (P,) (e.g. ``find_duplicates(...).pairs / .similarities``)."""
    pairs, sims = np.asarray(pairs).reshape(-1, 2), np.asarray(similarities).ravel()
    t = list(_as_pair_set(true))
    return [{"threshold": float(th), **pair_precision_recall(pairs[sims >= th], t)} for th in thresholds]
