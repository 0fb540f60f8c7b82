"""Patch correspondences between two images from DINOv2 patch features (``dinolab match``).

Mutual nearest neighbours: patch i of image 1 and patch j of image 2 match when j is the most
cosine-similar patch of image 2 to i *and* i is the most similar patch of image 1 to j. With
``foreground=True`` both images' patches are first restricted to the foreground of the joint PCA
(the rule of ``dinolab.viz.pca``: the first principal component, thresholded, with the sign chosen
so that the image borders are background), as in the DINOv2 paper's matching figure.

Example::

    model = dinolab.load_model("dinov2_vits14")
    m = match_patches(model, "left.jpg", "right.jpg", foreground=True)
    m.xy1[:5], m.xy2[:5], m.similarity[:5]          # pixel centres in each image, cosine
    draw_matches("left.jpg", "right.jpg", m, "match.png")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dinolab.data.images import load_rgb
from dinolab.io import atomic_save_figure, atomic_write_json
from dinolab.viz.pca import Foreground, patch_features, patch_pca

log = logging.getLogger(__name__)

ImageArg = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class PatchMatches:
    """Mutual nearest-neighbour patch pairs, best first (by cosine similarity).

    Attributes:
        idx1, idx2: (M,) flat patch indices (row-major over each image's grid).
        rc1, rc2: (M, 2) patch (row, column) in each grid.
        xy1, xy2: (M, 2) patch centres in pixels of each *original* image (x, y).
        similarity: (M,) cosine similarity of the pair.
        grid1, grid2: (h, w) patch grids; size1, size2: original (width, height).
        mask1, mask2: (h, w) bool foreground masks used (all True without ``foreground``).
    """

    idx1: np.ndarray
    idx2: np.ndarray
    rc1: np.ndarray
    rc2: np.ndarray
    xy1: np.ndarray
    xy2: np.ndarray
    similarity: np.ndarray
    grid1: tuple[int, int]
    grid2: tuple[int, int]
    size1: tuple[int, int]
    size2: tuple[int, int]
    mask1: np.ndarray
    mask2: np.ndarray

    def __len__(self) -> int:
        return len(self.idx1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: grids, sizes and one entry per match (pixel centres, patches, similarity)."""
        return {
            "grid1": list(self.grid1), "grid2": list(self.grid2),
            "size1": list(self.size1), "size2": list(self.size2), "n_matches": len(self),
            "matches": [{"xy1": [round(float(a), 2) for a in p1], "xy2": [round(float(a), 2) for a in p2],
                         "patch1": [int(a) for a in r1], "patch2": [int(a) for a in r2], "similarity": float(s)}
                        for p1, p2, r1, r2, s in zip(self.xy1, self.xy2, self.rc1, self.rc2, self.similarity)],
        }


def mutual_nearest_neighbours(f1: Tensor, f2: Tensor, mask1: Tensor | None = None,
                              mask2: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mutual nearest neighbours under cosine similarity.

    Args:
        f1, f2: (N1, D) and (N2, D) features.
        mask1, mask2: optional (N1,) / (N2,) bool; only these rows take part.

    Returns:
        (i, j, sim): (M,) indices into f1 and f2 and their cosine similarity, sorted by similarity
        (descending, ties by i). Swapping the inputs gives the same pairs swapped.
    """
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N1, D) and (N2, D), got {tuple(f1.shape)} and {tuple(f2.shape)}")
    rows1 = torch.arange(len(f1)) if mask1 is None else torch.nonzero(mask1.cpu(), as_tuple=True)[0]
    rows2 = torch.arange(len(f2)) if mask2 is None else torch.nonzero(mask2.cpu(), as_tuple=True)[0]
    if len(rows1) == 0 or len(rows2) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    a = torch.nn.functional.normalize(f1[rows1].double(), dim=1)  # float64: near-ties resolve the same both ways
    b = torch.nn.functional.normalize(f2[rows2].double(), dim=1)
    sim = a @ b.T  # (n1, n2)
    nn12 = sim.argmax(dim=1)  # (n1,) best of image 2 for each patch of image 1
    nn21 = sim.argmax(dim=0)  # (n2,) best of image 1 for each patch of image 2
    keep = torch.nonzero(nn21[nn12] == torch.arange(len(rows1)), as_tuple=True)[0]
    i, j = keep, nn12[keep]
    s = sim[i, j]
    order = torch.argsort(-s, stable=True)
    return rows1[i[order]], rows2[j[order]], s[order].float()


def _centres(idx: np.ndarray, grid: tuple[int, int], patch: int, fed: tuple[int, int],
             size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices -> (row, col) and the patch centres in original-image pixels (x, y)."""
    rc = np.stack([idx // grid[1], idx % grid[1]], axis=1)
    sx, sy = size[0] / fed[1], size[1] / fed[0]  # original / network-input pixels
    xy = np.stack([(rc[:, 1] + 0.5) * patch * sx, (rc[:, 0] + 0.5) * patch * sy], axis=1)
    return rc, xy


def _as_image(item: ImageArg) -> Image.Image:
    return item.convert("RGB") if isinstance(item, Image.Image) else load_rgb(item)


def match_patches(model: nn.Module, image1: ImageArg, image2: ImageArg, *, foreground: bool = False,
                  threshold: float = 0.0, foreground_rule: Foreground = "auto", short_side: int = 448,
                  device: str | None = None) -> PatchMatches:
    """Mutual-nearest-neighbour patch matches between two images (paths or PIL images).

    Features are the final-normed patch tokens (``dinolab.viz.pca.patch_features``: aspect ratio
    kept, short side about ``short_side``). ``foreground`` keeps only the PCA foreground patches of
    each image (``threshold`` and ``foreground_rule`` as in ``dinolab pca``).
    """
    images = [_as_image(image1), _as_image(image2)]
    feats = patch_features(model, images, short_side=short_side, device=device)  # [(h, w, D)] x 2
    grids = [(f.shape[0], f.shape[1]) for f in feats]
    if foreground:
        pca = patch_pca(feats, threshold=threshold, foreground=foreground_rule)
        masks = [torch.from_numpy(m) for m in pca.masks]
    else:
        masks = [torch.ones(g, dtype=torch.bool) for g in grids]
    flat = [f.reshape(-1, f.shape[-1]) for f in feats]  # (h w, D)
    i, j, s = mutual_nearest_neighbours(flat[0], flat[1], masks[0].flatten(), masks[1].flatten())
    p = model.patch_size
    fed = [(g[0] * p, g[1] * p) for g in grids]
    rc1, xy1 = _centres(i.numpy(), grids[0], p, fed[0], images[0].size)
    rc2, xy2 = _centres(j.numpy(), grids[1], p, fed[1], images[1].size)
    log.info("match: %d mutual nearest neighbours (%d x %d and %d x %d patches%s)", len(i), *grids[0], *grids[1],
             ", foreground only" if foreground else "")
    return PatchMatches(i.numpy(), j.numpy(), rc1, rc2, xy1, xy2, s.numpy(), grids[0], grids[1],
                        images[0].size, images[1].size, masks[0].numpy(), masks[1].numpy())


def draw_matches(image1: ImageArg, image2: ImageArg, matches: PatchMatches, out_png: str | os.PathLike, *,
                 max_lines: int = 100, title: str | None = None) -> Path:
    """The two images side by side (scaled to one height) with a coloured line per match.

    The ``max_lines`` most similar matches are drawn (all of them are in the JSON); line colours
    follow the position in image 1 (hue by angle around its centre), so neighbouring patches get
    neighbouring colours and crossings stand out.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = _as_image(image1), _as_image(image2)
    height = max(a.height, b.height, 320)  # small images are enlarged so lines and title stay readable
    sa, sb = height / a.height, height / b.height
    a = a.resize((round(a.width * sa), height), Image.Resampling.BICUBIC)
    b = b.resize((round(b.width * sb), height), Image.Resampling.BICUBIC)
    canvas = np.full((height, a.width + b.width, 3), 255, np.uint8)
    canvas[:, : a.width] = np.asarray(a)
    canvas[:, a.width:] = np.asarray(b)
    fig = Figure(figsize=(canvas.shape[1] / 100, canvas.shape[0] / 100 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(canvas)
    ax.set_axis_off()
    n = min(max_lines, len(matches))
    if n:
        p1, p2 = matches.xy1[:n] * sa, matches.xy2[:n] * sb + np.array([a.width, 0.0])
        centre = np.array([a.width / 2, height / 2])
        hue = (np.arctan2(*(p1 - centre).T[::-1]) / (2 * np.pi)) % 1.0
        colours = matplotlib.colormaps["hsv"](hue)
        for (x1, y1), (x2, y2), c in zip(p1, p2, colours):
            ax.plot([x1, x2], [y1, y2], color=c, linewidth=0.9, alpha=0.9)
            ax.scatter([x1, x2], [y1, y2], color=[c], s=6)
    ax.set_title(title or f"{n} of {len(matches)} mutual nearest neighbours", fontsize=9)
    return atomic_save_figure(fig, out_png)


def save_matches_json(matches: PatchMatches, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``matches.to_json()`` plus ``extra`` fields (image paths, model ...) atomically."""
    return atomic_write_json(path, {**extra, **matches.to_json()})
