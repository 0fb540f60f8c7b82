"""``dinolab seg predict``: a head + backbone applied to images, colour overlays and index masks.

Per image ``<out>/<name>.png`` ([image | overlay | legend]) and ``<out>/masks/<name>.png`` (class
indices, 8 or 16 bit), where ``<name>`` is the image id with its folders and extension
(``sub/ok.bmp.png``; ``dinolab.io.unique_output_names``), so no two images share an output file;
``predictions.json`` lists every image and counts the skipped ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dinolab.data.images import list_images_with_ids, load_rgb
from dinolab.eval.segmentation import Inference, SegHeadCheckpoint, segment
from dinolab.eval.segmentation_jobs import Resize, build_segmenter
from dinolab.io import atomic_write_json, unique_output_names
from dinolab.viz.overlay import overlay_figure, save_png

log = logging.getLogger(__name__)


def run_seg_predict(model: nn.Module, ckpt: SegHeadCheckpoint, images: Any, out_dir: str | Path, *,
                    inference: Inference, short_side: int | None, round_to_patch: bool, alpha: float = 0.5,
                    device: str | None = None, progress: bool = True) -> list[dict]:
    """Segment images (a folder, a ``.txt`` list or paths) and write, per image, ``<out>/<name>.png``
    ([image | overlay | legend]) and ``<out>/masks/<name>.png`` (class indices, 8 or 16 bit), where
    ``<name>`` is the image id with its folders and extension (``sub/ok.bmp.png``; see
    ``dinolab.io.unique_output_names``), so no two images share an output. Returns one record per
    image (id, files, class pixel shares); undecodable images are skipped, logged and counted in
    ``predictions.json`` (``n_listed``, ``n_written``, ``n_skipped``)."""
    paths, ids = list_images_with_ids(images)
    segmenter, dev = build_segmenter(model, ckpt, device)
    resize = Resize(short_side, segmenter.patch_size, round_to_patch)
    out, records = Path(out_dir), []
    for path, id_, name in tqdm(list(zip(paths, ids, unique_output_names(ids, ".png"))), desc="predict",
                                disable=not progress):
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001  (BadImageError and friends: skip, report)
            log.warning("skipping %s: %s", path, e)
            records.append({"id": id_, "skipped": str(e)})
            continue
        with torch.inference_mode():
            probs = segment(segmenter, resize.image(img)[None].to(dev), inference, out_size=(img.height, img.width))
        labels = probs.argmax(1)[0].cpu().numpy()
        fig = overlay_figure(img, labels, ckpt.classes, ckpt.palette, alpha=alpha)
        save_png(fig, out / name)
        save_png(labels.astype(np.uint8 if ckpt.num_classes <= 255 else np.uint16), out / "masks" / name)
        shares = np.bincount(labels.reshape(-1), minlength=ckpt.num_classes) / labels.size
        records.append({"id": id_, "overlay": name, "mask": f"masks/{name}",
                        "classes": {ckpt.classes[k]: round(float(v), 4) for k, v in enumerate(shares) if v > 0}})
    skipped = sum("skipped" in r for r in records)
    if skipped:
        log.warning("seg predict: skipped %d of %d images that could not be read (listed in predictions.json)",
                    skipped, len(records))
    atomic_write_json(out / "predictions.json", {"head": ckpt.source, "classes": ckpt.classes,
                                                  "palette": [list(c) for c in ckpt.palette],
                                                  "n_listed": len(records), "n_written": len(records) - skipped,
                                                  "n_skipped": skipped, "images": records})
    return records
