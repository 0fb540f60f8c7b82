"""``dinolab depth predict``: a depth head + backbone applied to images, and the depth figure.

Per image ``<out>/<name>_depth.png`` (image + colourised depth, colour bar in metres) and
``<out>/<name>_depth.npy`` (float32 metres), where ``<name>`` is the image id with its folders and
extension (``a/x.jpg_depth.png``; ``dinolab.io.unique_output_names``), so ``a/x.jpg`` and ``b/x.jpg``
do not overwrite each other. Images that cannot be read are skipped, logged and counted in
``predictions.json`` (``n_listed``, ``n_written``, ``n_skipped``), as ``seg predict`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dinolab.data.depth import DepthDataset
from dinolab.data.images import ImageSource, list_images_with_ids, load_rgb
from dinolab.eval.depth import check_backbone, predict_depth
from dinolab.eval.depth_heads import DepthHeadConfig, LoadedHead
from dinolab.eval.features import _precision
from dinolab.io import atomic_save_figure, atomic_write, atomic_write_json, safe_relpath, unique_output_names

log = logging.getLogger(__name__)

HEADLINE = ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")


def _sources(images: ImageSource | Sequence[ImageSource]) -> tuple[list[str], list[str]]:
    """(paths, ids) of one source (folder, list file, image) or of several: with several folders or
    list files, each one's ids are prefixed with its name so equal relative paths stay apart."""
    if isinstance(images, (str, os.PathLike)):
        return list_images_with_ids(images)
    items = list(images)
    if all(Path(s).suffix.lower() not in (".txt",) and not Path(s).is_dir() for s in items):
        return list_images_with_ids(items)  # image files: the paths as given are the ids
    paths, ids = [], []
    for src in items:
        p, i = list_images_with_ids(src)
        prefix = Path(src).stem if Path(src).is_dir() or Path(src).suffix.lower() == ".txt" else ""
        paths += p
        ids += [f"{prefix}/{x}" if prefix else x for x in i]
    return paths, ids


def predict_images(model: nn.Module, loaded: LoadedHead, images: ImageSource | Sequence[ImageSource],
                   out_dir: str | os.PathLike, *, short_side: int | None = None, unpad: str = "crop",
                   flip_tta: bool = False, device: str | None = None, progress: bool = True,
                   head_id: str | None = None) -> list[dict]:
    """Depth maps of ``images`` (a folder, a ``.txt`` list, image paths, or several folders / lists)
    into ``out_dir`` (layout in the module docstring); returns one record per image, with
    ``skipped`` (the reason) for those that could not be read."""
    check_backbone(model, loaded.config)
    dev, _ = _precision(device, None)
    out = Path(out_dir)
    paths, ids = _sources(images)
    rows: list[dict] = []
    for path, id_, name in tqdm(list(zip(paths, ids, unique_output_names(ids, "_depth"))), desc="depth predict",
                                unit="img", disable=not progress):
        try:
            image = load_rgb(path)
        except Exception as e:  # noqa: BLE001  (BadImageError and friends: skip, count, report)
            log.warning("skipping %s: %s", path, e)
            rows.append({"id": id_, "image": str(path), "skipped": str(e)})
            continue
        pred = predict_depth(model, loaded.head, loaded.config, image, short_side=short_side, unpad=unpad,
                             flip_tta=flip_tta, device=dev)
        atomic_write(out / f"{name}.npy", lambda f, a=pred: np.save(f, a.astype(np.float32)))
        save_depth_figure(out / f"{name}.png", image, pred, title=id_)
        rows.append({"id": id_, "image": str(path), "png": f"{name}.png", "npy": f"{name}.npy",
                     "min_m": float(pred.min()), "median_m": float(np.median(pred)), "max_m": float(pred.max())})
    skipped = sum("skipped" in r for r in rows)
    if skipped:
        log.warning("depth predict: skipped %d of %d images that could not be read (listed in predictions.json)",
                    skipped, len(rows))
    atomic_write_json(out / "predictions.json", {"head": head_id, "n_listed": len(rows),
                                                  "n_written": len(rows) - skipped, "n_skipped": skipped,
                                                  "images": rows})
    return rows


# --------------------------------------------------------------------------------- drawing


def save_depth_figure(path: str | os.PathLike, image: Image.Image, pred: np.ndarray, gt: np.ndarray | None = None,
                      *, title: str | None = None, cmap: str = "magma_r") -> Path:
    """Image | (ground truth) | prediction, one shared colour scale with a colour bar in metres;
    invalid ground-truth pixels (0) are grey. Written atomically as PNG."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [pred[np.isfinite(pred)]] + ([gt[gt > 0]] if gt is not None else [])
    lo = float(min(v.min() for v in values if v.size))
    hi = float(max(v.max() for v in values if v.size))
    panels = [("image", np.asarray(image))] + ([("ground truth", np.ma.masked_where(gt <= 0, gt))] if gt is not None
                                               else []) + [("prediction", pred)]
    aspect = image.width / image.height
    fig = Figure(figsize=(3.2 * aspect * len(panels) + 1.0, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="0.6")
    shown = None
    for ax, (name, data) in zip(axes, panels):
        if name == "image":
            ax.imshow(data)
        else:
            shown = ax.imshow(data, cmap=colormap, vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(shown, ax=list(axes), shrink=0.9, label="depth (m)")
    if title:
        fig.suptitle(title, fontsize=9)
    return atomic_save_figure(fig, path)


def draw_samples(model: nn.Module, head: nn.Module, cfg: DepthHeadConfig, ds: DepthDataset, folder: Path, n: int,
                 short_side: int | None, unpad: str, device: torch.device) -> None:
    """``save_depth_figure`` of the first ``n`` samples of ``ds`` (image | truth | prediction) into ``folder``."""
    for i in range(min(n, len(ds))):
        s = ds.load(i)
        pred = predict_depth(model, head, cfg, s.image, short_side=short_side, unpad=unpad, device=device)
        save_depth_figure(folder / f"{safe_relpath(s.id)}.png", s.image, pred, s.depth, title=s.id)


def format_depth_table(res: dict) -> str:
    """One header line and the headline metrics, printed at the end of ``dinolab depth train|eval``
    (n/a: a metric without a valid pixel)."""
    m = res.get("metrics") or res.get("val_metrics")
    what = res["dataset"]["name"] if "dataset" in res else (res["val"] or {}).get("name", "-")
    line = f"{res['task']} | model {res['model']} | {res['head_config']['kind']} head | {what}"
    if not m:
        return line + f" | final train loss {res['history'][-1]['loss']:.4f} (no --val set)"
    return line + "\n  " + "  ".join(f"{k} {m[k]:.4f}" if m[k] is not None else f"{k} n/a" for k in HEADLINE)
