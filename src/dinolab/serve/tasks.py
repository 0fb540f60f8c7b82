"""What the server computes, as plain functions of a backbone and PIL images (no HTTP here).

Every function runs the backbone once per image under ``torch.inference_mode`` and returns a small
dataclass of numbers and uint8 pictures; :mod:`dinolab.serve.app` turns those into JSON and PNGs.

Resolution: an image goes through the backbone with its short side resized to about ``short_side``
(a per-model setting) and its long side capped at ``max_side``, both sides rounded to patch
multiples, aspect ratio kept. Pictures come back at a display size (long side <= ``DISPLAY_SIDE``).

- :func:`embed`: CLS token and mean patch token.
- :func:`pca_colors`: the DINOv2 paper's PCA part colouring (``dinolab.viz.pca.patch_pca``).
- :func:`kmeans_segments`: unsupervised segmentation, spherical k-means of the patch features
  (``dinolab.curate.kmeans.kmeans``) into N segments, upsampled by the bilinear similarity to each
  segment centre (so borders follow the features, not the patch grid).
- :func:`query_feature`: the CLS feature of a retrieval query, with the transform ``dinolab embed``
  uses, so it is comparable with an index built by ``dinolab index build``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dinolab.curate.kmeans import kmeans
from dinolab.data.transforms import make_classification_transform, make_dense_transform
from dinolab.viz.pca import patch_pca

DISPLAY_SIDE = 768  # long side of the pictures the API returns


@dataclass(frozen=True)
class Features:
    """One image through the backbone: ``cls`` (D,), ``patches`` (h, w, D), float32 on the CPU;
    ``input_size`` the (H, W) the backbone saw."""

    cls: Tensor
    patches: Tensor
    input_size: tuple[int, int]


def input_size(width: int, height: int, patch: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(H, W) for the backbone: short side ~``short_side``, long side <= ``max_side`` (when a patch
    fits), both multiples of ``patch`` and at least one patch, aspect ratio kept to half a patch."""
    if min(width, height) < 1 or min(patch, short_side, max_side) < 1:
        raise ValueError(f"bad sizes: image {width}x{height}, patch {patch}, short side {short_side}, "
                         f"max side {max_side}")
    scale = short_side / min(width, height)
    scale = min(scale, max_side / max(width, height))
    return tuple(max(patch, round(s * scale / patch) * patch) for s in (height, width))  # type: ignore[return-value]


def display_image(img: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``img`` scaled down (never up) so its long side is at most ``side``."""
    scale = side / max(img.size)
    if scale >= 1:
        return img
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BICUBIC)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward(model: nn.Module, img: Image.Image, *, short_side: int, max_side: int) -> Features:
    """Run ``model`` on one image at the dense resolution (see the module docstring)."""
    patch = int(model.patch_size)
    h, w = input_size(img.width, img.height, patch, short_side, max_side)
    x = make_dense_transform(patch, short_side=None)(img.resize((w, h), Image.Resampling.BICUBIC))
    dev = _device(model)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
        out = model(x.unsqueeze(0).to(dev))  # x: (1, 3, H, W)
    gh, gw = out.grid
    return Features(cls=out.cls_token[0].float().cpu(),
                    patches=out.patch_tokens[0].float().cpu().reshape(gh, gw, -1), input_size=(h, w))


def query_feature(model: nn.Module, img: Image.Image, *, resize: int = 256, crop: int = 224) -> Tensor:
    """CLS feature (D,) with ``dinolab embed``'s transform (resize short side, centre crop)."""
    x = make_classification_transform(resize, crop)(img).unsqueeze(0).to(_device(model))
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x).cls_token[0].float().cpu()


# ---------------------------------------------------------------------------------------- embed


@dataclass(frozen=True)
class Embedding:
    cls: list[float]
    patch_mean: list[float]
    grid: tuple[int, int]
    input_size: tuple[int, int]


def embed(feats: Features) -> Embedding:
    """CLS token and mean patch token of one image."""
    gh, gw, _ = feats.patches.shape
    return Embedding(cls=feats.cls.tolist(), patch_mean=feats.patches.reshape(gh * gw, -1).mean(0).tolist(),
                     grid=(gh, gw), input_size=feats.input_size)


# ------------------------------------------------------------------------------------------ PCA


@dataclass(frozen=True)
class PcaResult:
    """``colors`` (H, W, 3) and ``mask`` (H, W) uint8 at display size; ``foreground`` share of patches."""

    colors: np.ndarray
    mask: np.ndarray
    foreground: float
    grid: tuple[int, int]


def _nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample an (h, w[, C]) uint8 array to PIL ``size`` (W, H) with nearest neighbours."""
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.NEAREST))


def pca_colors(feats: Features, size: tuple[int, int], *, threshold: float = 0.0,
               foreground: str = "auto") -> PcaResult:
    """PCA part colouring of one image, drawn at PIL ``size`` (W, H) (nearest-neighbour patches)."""
    res = patch_pca([feats.patches], threshold=threshold, foreground=foreground)  # type: ignore[arg-type]
    colors = (res.colors[0][..., :3] * 255).round().astype(np.uint8)  # (h, w, 3)
    mask = res.masks[0].astype(np.uint8) * 255  # (h, w)
    return PcaResult(colors=_nearest(colors, size), mask=_nearest(mask, size),
                     foreground=float(res.masks[0].mean()), grid=tuple(res.masks[0].shape))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- segmentation


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours: matplotlib's tab20 order (strong colours first), repeated if needed."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the 10 dark shades, then the 10 light ones
    return [tuple(round(c * 255) for c in tab[order[i % 20]]) for i in range(n)]  # type: ignore[misc]


@dataclass(frozen=True)
class Segmentation:
    """``labels`` (H, W) int at display size; ``names`` and ``colors`` per label; ``fractions`` of the
    picture each label covers."""

    labels: np.ndarray
    names: list[str]
    colors: list[tuple[int, int, int]]
    fractions: list[float]
    grid: tuple[int, int]


def kmeans_segments(feats: Features, size: tuple[int, int], k: int, *, seed: int = 0) -> Segmentation:
    """Unsupervised segmentation: spherical k-means of the patch features into ``k`` segments.

    Segments are numbered by decreasing area; the label map at PIL ``size`` (W, H) is the argmax of
    the bilinearly upsampled cosine similarity of each patch to each segment centre.
    """
    gh, gw, d = feats.patches.shape
    x = F.normalize(feats.patches.reshape(gh * gw, d), dim=1)  # (N, D)
    if not 2 <= k <= x.shape[0]:
        raise ValueError(f"segments must be between 2 and the number of patches ({x.shape[0]}), got {k}")
    res = kmeans(x, k, spherical=True, seed=seed, n_iter=30)
    counts = torch.bincount(res.assignments, minlength=k)
    order = torch.argsort(counts, descending=True, stable=True)  # new label j = old cluster order[j]
    sims = (x @ res.centroids[order].T).T.reshape(1, k, gh, gw)  # (1, k, h, w)
    w, h = size
    labels = F.interpolate(sims, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    fractions = np.bincount(labels.ravel(), minlength=k) / labels.size
    return Segmentation(labels=labels, names=[f"segment {i + 1}" for i in range(k)], colors=palette(k),
                        fractions=fractions.tolist(), grid=(gh, gw))


def colorize(labels: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) labels in [0, len(colors)) -> (H, W, 3) uint8."""
    return np.asarray(colors, dtype=np.uint8).reshape(-1, 3)[labels]


def blend(img: Image.Image, color: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``color`` (H, W, 3) uint8 laid over ``img`` (same size) with weight ``alpha``."""
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    return np.rint(base * (1 - alpha) + color.astype(np.float32) * alpha).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- encoding


def png_bytes(picture: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an (H, W[, 3]) uint8 array."""
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------ depth and matches


def capped_short_side(width: int, height: int, short_side: int, max_side: int, patch: int) -> int:
    """``short_side`` lowered so that the long side, scaled alike, stays <= ``max_side`` (>= one patch)."""
    return max(patch, min(short_side, int(max_side * min(width, height) / max(width, height))))


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 with matplotlib's magma, near = bright (min-max over the map).

    A map flat to within 1e-4 of its depth is drawn in one colour (float noise is not structure)."""
    from matplotlib import colormaps

    lo, hi = float(np.min(depth)), float(np.max(depth))
    flat = hi - lo <= 1e-4 * max(abs(hi), 1.0)
    near = np.zeros_like(depth) if flat else (hi - depth) / (hi - lo)
    return (colormaps["magma"](near)[..., :3] * 255).round().astype(np.uint8)


def draw_matches(img1: Image.Image, img2: Image.Image, xy1: np.ndarray, xy2: np.ndarray,
                 sizes: tuple[tuple[int, int], tuple[int, int]], max_lines: int = 50) -> Image.Image:
    """Both images side by side at one height with a line per match (the first ``max_lines``).

    ``xy1``/``xy2`` (M, 2) are pixel positions (x, y) in the original images of PIL ``sizes``;
    ``img1``/``img2`` may be smaller copies. Line colours follow the position in image 1 (hue by the
    angle around its centre), so neighbouring patches get neighbouring colours.
    """
    from matplotlib import colormaps
    from PIL import ImageDraw

    height = min(max(img1.height, img2.height), DISPLAY_SIDE // 2 + 128)
    a = img1.resize((max(1, round(img1.width * height / img1.height)), height), Image.Resampling.BICUBIC)
    b = img2.resize((max(1, round(img2.width * height / img2.height)), height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (a.width + b.width, height), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    n = min(max_lines, len(xy1))
    if n:
        p1 = xy1[:n] * np.array([a.width / sizes[0][0], height / sizes[0][1]])
        p2 = xy2[:n] * np.array([b.width / sizes[1][0], height / sizes[1][1]]) + np.array([a.width, 0.0])
        hue = (np.arctan2(p1[:, 1] - height / 2, p1[:, 0] - a.width / 2) / (2 * np.pi)) % 1.0
        colours = (colormaps["hsv"](hue)[:, :3] * 255).astype(int)
        draw = ImageDraw.Draw(canvas)
        for (x1, y1), (x2, y2), c in zip(p1, p2, colours):
            col = tuple(int(v) for v in c)
            draw.line([(x1, y1), (x2, y2)], fill=col, width=2)
            for x, y in ((x1, y1), (x2, y2)):
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col, outline=(0, 0, 0))
    return canvas
