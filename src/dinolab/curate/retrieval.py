"""``dinolab index build / search``: an exact or faiss index over an ``embed`` folder, queries by image
file(s) or id, results as JSON and as a contact sheet (query + neighbours).

The index records how its images were embedded (``info``: features key, resize / crop of the
transform, the embed folder and the folder the ids are relative to), so query images are embedded
the same way by default.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinolab.curate.embed import load_embedded
from dinolab.curate.index import Index, make_index, query_transform
from dinolab.errors import DinolabError
from dinolab.io import atomic_save_figure, atomic_write_json

log = logging.getLogger(__name__)


def transform_sizes(transform: dict | str) -> dict[str, int]:
    """``{"resize", "crop"}`` of a ``make_classification_transform`` as embed's meta.json records it (a
    dict; older folders: its repr text), or {} when the transform is another one."""
    if isinstance(transform, dict):
        sizes = {k: transform.get(k) for k in ("resize", "crop")}
        return sizes if all(isinstance(v, int) for v in sizes.values()) else {}
    resize = re.search(r"Resize\(size=\[(\d+)\]", transform)
    crop = re.search(r"CenterCrop\(size=\((\d+), (\d+)\)\)", transform)
    if not (resize and crop) or crop.group(1) != crop.group(2):
        return {}
    return {"resize": int(resize.group(1)), "crop": int(crop.group(1))}


def build_index(embed_dir: str | os.PathLike, out_dir: str | os.PathLike, *, key: str = "cls",
                kind: str = "auto", **index_kw) -> Index:
    """Index the ``key`` features (default CLS) of a finished ``dinolab embed`` folder into ``out_dir``.

    ``kind``: ``auto`` (by size), ``exact`` (torch), or a faiss kind (flat, ivf, hnsw, ivfpq) with
    ``index_kw`` as in ``curate.index.make_index``.
    """
    ids, features, meta = load_embedded(embed_dir, key)
    if not np.isfinite(features).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(np.asarray(features)).all(axis=1))[:3]]
        raise DinolabError(f"{embed_dir} holds non-finite features (NaN or inf), e.g. for {', '.join(bad)}: the "
                           "model that embedded them is broken; re-embed with another one")
    info = {"key": key, "embeddings": str(Path(embed_dir).resolve()), **transform_sizes(meta.get("transform", ""))}
    if meta.get("id_root"):
        info["id_root"] = meta["id_root"]
    feats = torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy of the memory map
    index = make_index(feats, ids, meta.get("model_id", ""), kind=kind, info=info, **index_kw)
    index.save(out_dir)
    log.info("indexed %d images (%s, dim %d, %s) into %s", len(index), key, index.dim, index.kind, out_dir)
    return index


def search(index: Index, *, k: int = 10, model: nn.Module | None = None,
           images: Sequence[str | os.PathLike] = (), ids: Sequence[str] = (), device: str | None = None,
           resize: int | None = None, crop: int | None = None, batch_size: int = 64,
           progress: bool | None = None, **search_kw) -> list[dict]:
    """Neighbours of query images (embedded with ``model``) and/or of indexed ids (itself excluded).

    Query images go through the classification transform with ``resize`` / ``crop``, by default the
    sizes the index was embedded with (its ``info``), else 256 / 224. ``search_kw`` (``nprobe``,
    ``ef_search``) go to a faiss index's ``search``. ``progress`` None: a bar for more than one batch.
    Returns one dict per query: ``{"query", "kind": "image" | "id", "neighbours": [{"id", "score"}, ...]}``;
    a query image that cannot be read is skipped (logged) and listed as ``{"query", "kind": "image",
    "neighbours": [], "skipped": reason}``. Image queries' names are the paths as given (relative to
    the working directory), id queries' the indexed ids.
    """
    if k < 1:
        raise DinolabError(f"k must be >= 1, got {k}")
    queries, names, kinds, skipped = [], [], [], []
    if images:
        if model is None:
            raise DinolabError("searching by image needs a model (the one the index was built with)")
        from dinolab.data.transforms import make_classification_transform
        from dinolab.eval.features import extract_features

        tf = make_classification_transform(*query_transform(index.info, resize, crop))
        feats = extract_features(model, list(images), transform=tf, device=device, batch_size=batch_size,
                                 progress=len(images) > batch_size if progress is None else progress)
        skipped = [(str(i), reason) for i, reason in feats.skipped]
        if skipped:
            log.warning("skipped %d of %d query images that could not be read, e.g. %s (%s)", len(skipped),
                        len(images), *skipped[0])
        if not feats.ids and not ids:
            raise DinolabError(f"none of the {len(images)} query images could be read, e.g. {skipped[0][0]}: "
                               f"{skipped[0][1]}")
        bad = [str(feats.ids[i]) for i in np.flatnonzero(~torch.isfinite(feats.cls).all(dim=1).numpy())[:3]]
        if bad:
            raise DinolabError("the model gives non-finite features (NaN or inf) for the query image(s) "
                               f"{', '.join(bad)}: its weights are broken")
        if feats.ids and feats.cls.shape[1] != index.dim:
            raise DinolabError(f"the model gives {feats.cls.shape[1]}-d features but the index holds {index.dim}-d "
                               f"ones (built with {index.model_id or 'an unnamed model'}); pass that --model")
        queries.append(feats.cls)
        names += [str(i) for i in feats.ids]
        kinds += ["image"] * len(feats.ids)
    if ids:
        pos = {i: n for n, i in enumerate(index.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise DinolabError(f"ids not in the index: {missing[:3]}")
        queries.append(index.vectors([pos[i] for i in ids]))
        names += list(ids)
        kinds += ["id"] * len(ids)
    if not names:
        raise DinolabError("give query images (--image / --images) or indexed ids (--id)")
    scores, idx = index.search(torch.cat(queries), k + 1, **search_kw)
    out = []
    for q, (s_row, i_row) in enumerate(zip(scores.tolist(), idx.tolist())):
        hits = [(index.ids[i], s) for i, s in zip(i_row, s_row) if i >= 0 and index.ids[i] != names[q]][:k]
        out.append({"query": names[q], "kind": kinds[q], "neighbours": [{"id": i, "score": s} for i, s in hits]})
    return out + [{"query": name, "kind": "image", "neighbours": [], "skipped": reason} for name, reason in skipped]


def contact_sheet(results: list[dict], images_root: str | os.PathLike | None, out_png: str | os.PathLike) -> Path:
    """One row per query: the query image, then its neighbours with their scores. Indexed ids are
    found under ``images_root``; query image files (``kind`` "image") where they were given, relative
    to the working directory. Skipped queries get no row."""
    from matplotlib.figure import Figure

    from dinolab.data.images import load_rgb

    def resolve(name: str, root: str | os.PathLike | None) -> Path:
        p = Path(name)
        return p if p.is_absolute() or root is None else Path(root) / p

    results = [r for r in results if "skipped" not in r]
    if not results:
        raise DinolabError("no query could be read: nothing to draw on the contact sheet")
    cols = 1 + max(len(r["neighbours"]) for r in results)
    fig = Figure(figsize=(1.6 * cols, 1.7 * len(results)))
    axes = np.atleast_2d(fig.subplots(len(results), cols, squeeze=False))
    for row, r in enumerate(results):
        query_root = None if r.get("kind") == "image" else images_root  # a file: relative to the CWD
        cells = [(r["query"], "query", query_root)] + [(n["id"], f"{n['score']:.3f}", images_root)
                                                       for n in r["neighbours"]]
        for col, ax in enumerate(axes[row]):
            ax.set_axis_off()
            if col < len(cells):
                name, label, root = cells[col]
                try:
                    ax.imshow(load_rgb(resolve(name, root)))
                except DinolabError:
                    ax.text(0.5, 0.5, "missing", ha="center", va="center")
                ax.set_title(label, fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, out_png)


def save_results(results: list[dict], out_json: str | os.PathLike) -> Path:
    return atomic_write_json(out_json, results)
