"""``dinolab index build / search``: an exact index over an ``embed`` folder, queries by image or id,
results as JSON and as a contact sheet (query + neighbours)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinolab.curate.embed import load_embeddings
from dinolab.curate.index import ExactIndex
from dinolab.errors import DinolabError
from dinolab.io import atomic_save_figure, atomic_write_json

log = logging.getLogger(__name__)


def build_index(embed_dir: str | os.PathLike, out_dir: str | os.PathLike, *, key: str = "cls") -> ExactIndex:
    """Index the ``key`` features (default CLS) of a finished ``dinolab embed`` folder into ``out_dir``."""
    ids, arrays = load_embeddings(embed_dir)
    if key not in arrays:
        raise DinolabError(f"{embed_dir} has no '{key}' features (has {sorted(arrays)}); embed with --pooling {key}")
    if not ids:
        raise DinolabError(f"{embed_dir} holds no embedded images (all skipped?); see its skipped.txt")
    meta = json.loads((Path(embed_dir) / "meta.json").read_text())
    index = ExactIndex(torch.from_numpy(np.asarray(arrays[key], dtype=np.float32)), ids, meta.get("model_id", ""))
    index.save(out_dir)
    log.info("indexed %d images (%s, dim %d) into %s", len(index), key, index.dim, out_dir)
    return index


def search(index: ExactIndex, *, k: int = 10, model: nn.Module | None = None,
           images: Sequence[str | os.PathLike] = (), ids: Sequence[str] = (), device: str | None = None) -> list[dict]:
    """Neighbours of query images (embedded with ``model``) and/or of indexed ids (itself excluded).

    Returns one dict per query: ``{"query", "neighbours": [{"id", "score"}, ...]}``.
    """
    queries, names = [], []
    if images:
        if model is None:
            raise DinolabError("searching by image needs a model (the one the index was built with)")
        from dinolab.eval.features import extract_features

        feats = extract_features(model, list(images), device=device, progress=False)
        if feats.skipped:
            raise DinolabError(f"query image {feats.skipped[0][0]} could not be decoded: {feats.skipped[0][1]}")
        queries.append(feats.cls)
        names += [str(i) for i in feats.ids]
    if ids:
        pos = {i: n for n, i in enumerate(index.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise DinolabError(f"ids not in the index: {missing[:3]}")
        queries.append(index.features[[pos[i] for i in ids]].cpu())
        names += list(ids)
    if not names:
        raise DinolabError("give query images (--image) or indexed ids (--id)")
    scores, idx = index.search(torch.cat(queries), k + 1)
    out = []
    for q, (s_row, i_row) in enumerate(zip(scores.tolist(), idx.tolist())):
        hits = [(index.ids[i], s) for i, s in zip(i_row, s_row) if index.ids[i] != names[q]][:k]
        out.append({"query": names[q], "neighbours": [{"id": i, "score": s} for i, s in hits]})
    return out


def contact_sheet(results: list[dict], images_root: str | os.PathLike | None, out_png: str | os.PathLike) -> Path:
    """One row per query: the query image, then its neighbours with their scores."""
    from matplotlib.figure import Figure

    from dinolab.data.images import load_rgb

    def resolve(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() or images_root is None else Path(images_root) / p

    cols = 1 + max(len(r["neighbours"]) for r in results)
    fig = Figure(figsize=(1.6 * cols, 1.7 * len(results)))
    axes = np.atleast_2d(fig.subplots(len(results), cols, squeeze=False))
    for row, r in enumerate(results):
        cells = [(r["query"], "query")] + [(n["id"], f"{n['score']:.3f}") for n in r["neighbours"]]
        for col, ax in enumerate(axes[row]):
            ax.set_axis_off()
            if col < len(cells):
                name, label = cells[col]
                try:
                    ax.imshow(load_rgb(resolve(name)))
                except DinolabError:
                    ax.text(0.5, 0.5, "missing", ha="center", va="center")
                ax.set_title(label, fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, out_png)


def save_results(results: list[dict], out_json: str | os.PathLike) -> Path:
    return atomic_write_json(out_json, results)
