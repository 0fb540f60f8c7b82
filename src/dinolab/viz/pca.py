"""PCA part colouring of patch features, the DINOv2 paper figure ("dinolab pca").

Recipe (DINOv2 paper, "PCA of patch features"):

1. Fit a PCA on the patch features of all images together and project on the first component.
2. Threshold that component: patches on the foreground side are kept, the rest is background.
   The sign of a principal component is arbitrary, so ``foreground="auto"`` orients it so that
   the border patches of the images (usually background) fall on the background side; with
   grids too small to have an interior it falls back to "the foreground is the minority".
3. Fit a second PCA on the kept patches of all images together and map its first three
   components to RGB, each min-max normalised across *all* images, so that matching object parts
   get the same colour in every image. Background patches are black.

Example::

    model = dinolab.load_model("dinov2_vits14")
    pca_figure(model, None, "pca.png")          # the scikit-image sample photos
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dinolab.data.images import BadImageError, load_rgb
from dinolab.data.transforms import make_dense_transform
from dinolab.errors import DinolabError
from dinolab.io import atomic_save_figure

log = logging.getLogger(__name__)

Foreground = Literal["auto", "minority", "all"]
ImageInput = str | os.PathLike | tuple[str, Image.Image]

# Photos bundled inside the scikit-image wheel (loaded without pooch or network).
# The motorcycle stereo pair shows the same object twice, so part matching is visible.
SAMPLE_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right")


@dataclass(frozen=True)
class PatchPCA:
    """Result of :func:`patch_pca`, one entry per image.

    Attributes:
        colors: (h, w, C) float32 in [0, 1], C = ``n_components``; background patches are 0.
        masks: (h, w) bool, True on foreground patches (all True with ``foreground="all"``).
        scores: (h, w) float32 first-component score in units of its standard deviation,
            oriented so that foreground is positive (zeros with ``foreground="all"``).
    """

    colors: list[np.ndarray]
    masks: list[np.ndarray]
    scores: list[np.ndarray]


def sample_images(names: Sequence[str] | None = None) -> list[tuple[str, Image.Image]]:
    """Sample photos shipped inside scikit-image, as ``(name, RGB image)`` pairs; works offline.

    ``names`` picks from :data:`SAMPLE_IMAGES` (default: all of them, in that order).
    """
    try:
        from skimage import data
    except ImportError as e:  # a declared dependency, but say what to do if it is missing
        raise ImportError("sample images need scikit-image: pip install scikit-image") from e
    out = []
    for name in names or SAMPLE_IMAGES:
        if name not in SAMPLE_IMAGES:
            raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(SAMPLE_IMAGES)}")
        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            array = left if name.endswith("left") else right
        else:
            array = getattr(data, name)()
        out.append((name, Image.fromarray(array).convert("RGB")))
    return out


def _top_components(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean (D,) and the top-``k`` principal directions (k, D) of the rows of ``x`` (N, D).

    Eigen-decomposition of the covariance in float64 (deterministic, no sklearn); each direction's
    sign is fixed so that its largest-magnitude loading is positive.
    """
    mean = x.mean(0)
    xc = x - mean
    cov = (xc.T @ xc).double() / max(len(x) - 1, 1)  # (D, D)
    _, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = evecs[:, -min(k, x.shape[1]):].flip(-1).T  # (k, D), descending variance
    peak = comps.gather(1, comps.abs().argmax(1, keepdim=True))
    return mean, (comps * peak.sign()).to(x.dtype)


def _split(flat: Tensor, grids: list[tuple[int, int]]) -> list[Tensor]:
    """Cut a concatenation over images back into per-image (h, w, ...) pieces."""
    pieces = flat.split([h * w for h, w in grids])
    return [p.reshape(h, w, *flat.shape[1:]) for p, (h, w) in zip(pieces, grids)]


def _orientation(scores: list[Tensor], rule: Foreground) -> float:
    """+1 or -1 so that the foreground is on the positive side of the (centred) first component.

    ``"auto"``: border patches are background, when some grid has an interior (h, w > 2).
    ``"minority"`` (and ``"auto"`` without an interior): the foreground is the smaller side.
    """
    border = [torch.cat([s[0], s[-1], s[1:-1, 0], s[1:-1, -1]]) for s in scores if min(s.shape) > 2]
    if rule == "auto" and border:
        return -1.0 if torch.cat(border).mean() > 0 else 1.0
    positive_share = (torch.cat([s.flatten() for s in scores]) > 0).float().mean()
    return -1.0 if positive_share > 0.5 else 1.0


def _foreground(
    x: Tensor, grids: list[tuple[int, int]], threshold: float, rule: Foreground
) -> tuple[list[Tensor], list[Tensor]]:
    """First-component scores (h, w) in std units with the foreground side positive, and masks."""
    if rule == "all":
        return [torch.zeros(g) for g in grids], [torch.ones(g, dtype=torch.bool) for g in grids]
    if rule not in ("auto", "minority"):
        raise ValueError(f"foreground must be 'auto', 'minority' or 'all', got {rule!r}")
    mean, comps = _top_components(x, 1)
    score = (x - mean) @ comps[0]  # (N,)
    scores = _split(score / score.std().clamp_min(1e-12), grids)
    sign = _orientation(scores, rule)
    scores = [sign * s for s in scores]
    return scores, [s > threshold for s in scores]


def patch_pca(
    features: Sequence[Tensor],
    *,
    threshold: float = 0.0,
    foreground: Foreground = "auto",
    n_components: int = 3,
) -> PatchPCA:
    """Colour patches by a PCA fitted jointly on all images (see the module docstring).

    Args:
        features: one (h, w, D) patch-feature tensor per image; grids may differ.
        threshold: foreground cut on the first component, in standard deviations of its score
            (0.0, the mean, is the paper's "positive value" rule; raise it for a tighter mask).
        foreground: ``"auto"`` (border patches are background), ``"minority"`` (the smaller side
            of the cut is foreground) or ``"all"`` (no masking: one PCA on all patches).
        n_components: components mapped to colour channels (3 for RGB).
    """
    if not features or any(f.ndim != 3 for f in features):
        raise ValueError("features must be a non-empty list of (h, w, D) tensors")
    grids = [(f.shape[0], f.shape[1]) for f in features]
    x = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).float().cpu()  # (N, D)
    scores, masks = _foreground(x, grids, threshold, foreground)
    keep = torch.cat([m.flatten() for m in masks])
    colors = torch.zeros(len(x), n_components)
    log.info("patch PCA: %d images, %d of %d patches foreground", len(grids), int(keep.sum()), len(x))
    if keep.sum() >= 2:
        colors[keep] = _fg_colors(x[keep], n_components)
    else:
        log.warning("patch PCA: fewer than 2 foreground patches; lower the threshold")
    return PatchPCA(
        colors=[c.numpy() for c in _split(colors, grids)],
        masks=[m.numpy() for m in masks],
        scores=[s.float().numpy() for s in scores],
    )


def _fg_colors(x: Tensor, n_components: int) -> Tensor:
    """Second PCA on foreground rows (M, D) -> (M, n_components) in [0, 1], min-max per component."""
    mean, comps = _top_components(x, n_components)
    proj = (x - mean) @ comps.T  # (M, k), k <= n_components when D is tiny
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    out = torch.zeros(len(x), n_components)
    out[:, : proj.shape[1]] = proj
    return out


def _named_images(images: Sequence[ImageInput] | None) -> list[tuple[str, Image.Image]]:
    """Paths or ``(name, PIL image)`` pairs -> ``(name, RGB image)``; None -> sample images. Files that
    cannot be decoded are skipped with a warning; when none can, ``DinolabError``."""
    if images is None:
        return sample_images()
    out, bad = [], []
    for item in images:
        if isinstance(item, tuple):
            name, img = item
            out.append((str(name), img.convert("RGB")))
        else:
            try:
                out.append((Path(item).name, load_rgb(item)))
            except BadImageError as e:  # skipped and counted, as everywhere else
                bad.append(str(e))
    if bad:
        log.warning("skipped %d of %d images that could not be decoded: %s", len(bad), len(bad) + len(out),
                    "; ".join(bad[:5]))
    if not out and bad:
        raise DinolabError(f"none of the {len(bad)} images could be decoded: {bad[0]}")
    if not out:
        raise ValueError("no images given")
    return out


def patch_features(
    model: nn.Module, images: Sequence[Image.Image], *, short_side: int = 448, device: str | None = None
) -> list[Tensor]:
    """Final-normed patch features, one (h, w, D) float32 CPU tensor per image.

    Images run one at a time (sizes differ), aspect ratio kept by the dense transform; bf16
    autocast on CUDA only. ``device`` moves the model there (default: where the model is).
    The model is put in eval mode and its previous mode restored afterwards.
    """
    dev = torch.device(device) if device else next(model.parameters()).device
    model.to(dev)
    was_training = model.training
    model.eval()
    transform = make_dense_transform(patch_size=model.patch_size, short_side=short_side)
    feats = []
    try:
        for img in images:
            x = transform(img).unsqueeze(0).to(dev)  # (1, 3, H, W)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(x)
            feats.append(out.patch_tokens[0].float().cpu().reshape(*out.grid, -1))  # (h, w, D)
    finally:
        model.train(was_training)
    return feats


def _upsample(colors: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) in [0, 1] -> (H, W, 3) uint8 with nearest-neighbour upsampling to PIL ``size``."""
    if colors.shape[-1] == 1:
        colors = np.repeat(colors, 3, axis=-1)
    elif colors.shape[-1] == 2:
        colors = np.concatenate([colors, np.zeros_like(colors[..., :1])], axis=-1)
    rgb = Image.fromarray((colors[..., :3] * 255).round().astype(np.uint8))
    return np.asarray(rgb.resize(size, Image.Resampling.NEAREST))


def _save_grid(named: list[tuple[str, Image.Image]], result: PatchPCA, out_png: Path, show_mask: bool,
               title: str) -> None:
    """Draw the figure (one column per image, named; ``title`` above) with the Agg canvas and write it
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 3 if show_mask else 2
    ratios = [img.width / img.height for _, img in named]
    fig = Figure(figsize=(2.5 * sum(ratios), 2.5 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(named), squeeze=False, gridspec_kw={"width_ratios": ratios})
    for col, ((name, img), colors, mask) in enumerate(zip(named, result.colors, result.masks)):
        panels = [np.asarray(img), _upsample(colors, img.size)]
        if show_mask:
            panels.append(_upsample(mask[..., None].astype(np.float32), img.size))
        for row, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
        axes[0, col].set_title(name if len(name) <= 40 else name[:37] + "...", fontsize=9)
    fig.suptitle(title, fontsize=10)
    atomic_save_figure(fig, out_png)


def pca_figure(
    model: nn.Module,
    images: Sequence[ImageInput] | None,
    out_png: str | os.PathLike,
    *,
    short_side: int = 448,
    threshold: float = 0.0,
    foreground: Foreground = "auto",
    n_components: int = 3,
    show_mask: bool = True,
    device: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write the PCA part-colouring figure: rows = input, PCA colours, (foreground mask); the title
    names the model (``model_name``, default its variant name or class), each column its image.

    ``images``: paths, ``(name, PIL image)`` pairs, or None for :func:`sample_images`. The PCA is
    fitted jointly over all images (put images of one category together to see parts match).
    Other arguments: see :func:`patch_features` and :func:`patch_pca`. Returns the PNG path.
    """
    named = _named_images(images)
    feats = patch_features(model, [img for _, img in named], short_side=short_side, device=device)
    result = patch_pca(feats, threshold=threshold, foreground=foreground, n_components=n_components)
    out = Path(out_png)
    name = model_name or getattr(model, "name", None) or type(model).__name__
    title = f"PCA of {name} patch features, {len(named)} image{'s' if len(named) > 1 else ''}"
    _save_grid(named, result, out, show_mask=show_mask and foreground != "all", title=title)
    log.info("wrote PCA figure for %d images to %s", len(named), out)
    return out
