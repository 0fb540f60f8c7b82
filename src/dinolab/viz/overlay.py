"""Colour overlays of label maps with a legend (``dinolab seg predict``).

Example::

    labels = logits.argmax(0).numpy()                       # (H, W) class indices
    fig = overlay_figure(image, labels, classes, palette)   # [image | overlay | legend] as a PIL image
    save_png(fig, "pred/0001.png")
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinolab.io import atomic_write

Colour = tuple[int, int, int]
SWATCH = 14  # legend colour-square side, px
ROW = 18  # legend row height, px


# hue sequence beyond tab20: (saturation, value) levels that stay apart from tab20's and each other
_EXTRA_LEVELS = ((1.0, 0.5), (0.5, 0.55), (1.0, 1.0), (0.8, 0.3), (0.6, 0.9))
_GOLDEN = 0.618033988749895


def distinct_palette(n: int) -> list[Colour]:
    """``n`` class colours with distinct hues, for labels without a palette of their own: matplotlib's
    qualitative ``tab20`` (its 10 strong shades, then the 10 light ones), then a golden-ratio hue
    sequence over a few saturation / value levels. Neighbouring indices never get near-identical
    colours (the VOC bit-pattern palette gives classes 1 and 8 dark red and darker red)."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    out: list[Colour] = [tuple(round(c * 255) for c in tab[order[i]]) for i in range(min(n, 20))]  # type: ignore[misc]
    k = len(_EXTRA_LEVELS)
    for i in range(n - len(out)):
        s, v = _EXTRA_LEVELS[i % k]
        h = ((i // k) * _GOLDEN + (i % k) / (2 * k)) % 1.0
        out.append(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)))  # type: ignore[arg-type]
    return out


def colorize(labels: np.ndarray, palette: Sequence[Colour], ignore_index: int = 255,
             ignore_colour: Colour = (0, 0, 0)) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ``ignore_index`` pixels get ``ignore_colour``."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & ((labels < len(palette)) | (labels == ignore_index))
    if not valid.all():
        bad = np.unique(labels[~valid])[:5].tolist()
        raise ValueError(f"labels {bad} have no colour in the {len(palette)}-colour palette and are not the "
                         f"ignore index {ignore_index}: give one colour per class")
    lut = np.zeros((max(len(palette), ignore_index + 1), 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    if ignore_index >= len(palette):
        lut[ignore_index] = ignore_colour
    return lut[labels]


def overlay(image: Image.Image | np.ndarray, labels: np.ndarray, palette: Sequence[Colour], *, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend class colours over ``image`` (same H, W as ``labels``): (H, W, 3) uint8.

    ``alpha`` is the colour's weight; ignored pixels show the image unchanged.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.shape[:2] != np.asarray(labels).shape:
        raise ValueError(f"image {rgb.shape[1]}x{rgb.shape[0]} and labels {labels.shape[1]}x{labels.shape[0]} "
                         "(WxH) differ in size: resize the labels to the image first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize(labels, palette, ignore_index).astype(np.float32)
    w = np.where(np.asarray(labels)[..., None] == ignore_index, 0.0, alpha)  # (H, W, 1)
    return np.rint(rgb * (1 - w) + colours * w).clip(0, 255).astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def legend(classes: Sequence[str], palette: Sequence[Colour], height: int, *, width: int = 180) -> Image.Image:
    """A white panel of colour squares and class names, ``height`` px tall (more columns if needed)."""
    per_col = max(1, (height - 8) // ROW)
    cols = max(1, -(-len(classes) // per_col))
    panel = Image.new("RGB", (width * cols, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(panel), _font()
    for k, (name, colour) in enumerate(zip(classes, palette)):
        x, y = 6 + (k // per_col) * width, 4 + (k % per_col) * ROW
        draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + SWATCH + 6, y), str(name)[:24], fill=(0, 0, 0), font=font)
    return panel


def overlay_figure(image: Image.Image, labels: np.ndarray, classes: Sequence[str], palette: Sequence[Colour], *,
                   alpha: float = 0.5, ignore_index: int = 255, present_only: bool = True) -> Image.Image:
    """[image | overlay | legend] side by side; the legend lists the classes present (or all)."""
    blended = Image.fromarray(overlay(image, labels, palette, alpha=alpha, ignore_index=ignore_index))
    shown = sorted(set(np.unique(labels).tolist()) - {ignore_index}) if present_only else range(len(classes))
    key = legend([classes[k] for k in shown], [palette[k] for k in shown], max(image.height, 2 * ROW + 8))
    out = Image.new("RGB", (2 * image.width + key.width, max(image.height, key.height)), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(blended, (image.width, 0))
    out.paste(key, (2 * image.width, 0))
    return out


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write a PIL image or an (H, W[, 3]) uint8 array as PNG, atomically."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return atomic_write(path, lambda f: img.save(f, format="PNG"), fsync=False)
