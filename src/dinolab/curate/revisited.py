"""The revisited Oxford / Paris retrieval protocol (Radenović et al., CVPR 2018, "Revisiting Oxford and
Paris: Large-Scale Image Retrieval Benchmarking").

Ground truth: ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` hold a dict ``{"imlist": [database names],
"qimlist": [query names], "gnd": [one dict per query: "easy", "hard", "junk" (database indices) and
"bbx" (x1, y1, x2, y2 of the query region)]}``; images are ``jpg/<name>.jpg``.

Three settings re-label each query's database images (``setting_ground_truth``):

=======  ===================  =====================
setting  positives ("ok")     ignored ("junk")
=======  ===================  =====================
easy     easy                 hard + junk
medium   easy + hard          junk
hard     hard                 easy + junk
=======  ===================  =====================

``revisited_map`` scores ranked lists the way the protocol's reference code does:

* ignored images are removed from the ranking (positives after them move up);
* AP is the area under the precision-recall curve by the trapezoid rule: the j-th positive
  (0-based) at rank r (0-based, after removal) adds ``(p0 + p1) / 2 / n_ok`` with
  ``p0 = j / r`` (1 when r = 0) and ``p1 = (j + 1) / (r + 1)``; positives that are not in the
  list add nothing;
* mP@k: with 1-based ranks of the positives, ``kq = min(k, last positive rank)`` and
  ``mP@k = (positives ranked <= kq) / kq`` (the reference code's definition);
* queries without positives are left out of the means.

``evaluate_revisited`` embeds the database and the query regions (cropped by ``bbx``) with a
backbone, ranks by cosine similarity of the CLS features and reports the three settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinolab.errors import DinolabError
from dinolab.models.safe_load import safe_pickle_load

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "SETTINGS", "RevisitedDataset", "evaluate_revisited", "load_revisited",
           "revisited_ap", "revisited_map", "setting_ground_truth"]

DATASETS = ("roxford5k", "rparis6k")
SETTINGS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)
_SETTING_PARTS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                  "hard": (("hard",), ("junk", "easy"))}
@dataclass
class RevisitedDataset:
    """One dataset's ground truth and where its images are: ``jpg_dir / (name + ".jpg")``."""

    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    jpg_dir: Path

    def image_path(self, name: str) -> Path:
        return self.jpg_dir / f"{name}.jpg"


def _find_base(root: Path, dataset: str) -> Path:
    for base in (root, root / dataset, root / "datasets" / dataset):
        if (base / f"gnd_{dataset}.pkl").is_file():
            return base
    raise DinolabError(
        f"no gnd_{dataset}.pkl under {root} (looked in ., {dataset}/, datasets/{dataset}/); download it from "
        f"http://cmp.felk.cvut.cz/revisitop/data/datasets/{dataset}/gnd_{dataset}.pkl and put the images in "
        "jpg/ beside it"
    )


def load_revisited(root: str | os.PathLike, dataset: str) -> RevisitedDataset:
    """Read ``gnd_<dataset>.pkl`` under ``root`` (or ``root/<dataset>``, ``root/datasets/<dataset>``)."""
    if dataset not in DATASETS:
        raise DinolabError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    base = _find_base(Path(root), dataset)
    path = base / f"gnd_{dataset}.pkl"
    data = safe_pickle_load(path)  # containers and numpy arrays only: a ground-truth file cannot run code
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= data.keys():
        raise DinolabError(f"{path} lacks the imlist / qimlist / gnd entries of the revisited layout")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise DinolabError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    return RevisitedDataset(dataset, [str(n) for n in data["imlist"]], [str(n) for n in data["qimlist"]],
                            list(data["gnd"]), base / "jpg")


def setting_ground_truth(gnd: Sequence[dict], setting: str) -> list[dict[str, np.ndarray]]:
    """Per query ``{"ok", "junk"}`` index arrays of one setting (easy / medium / hard, table above)."""
    if setting not in _SETTING_PARTS:
        raise DinolabError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    ok_keys, junk_keys = _SETTING_PARTS[setting]

    def cat(g: dict, keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64).ravel() for k in keys])

    return [{"ok": cat(g, ok_keys), "junk": cat(g, junk_keys)} for g in gnd]


def _positive_ranks(ranked: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranked`` once the junk items are taken out, ascending."""
    is_ok, is_junk = np.isin(ranked, ok), np.isin(ranked, junk)
    pos = np.flatnonzero(is_ok)
    junk_before = np.cumsum(is_junk)[pos] if pos.size else pos  # junk at earlier ranks (never at pos)
    return pos - junk_before


def revisited_ap(ranked: Sequence[int] | np.ndarray, ok: Sequence[int], junk: Sequence[int] = ()) -> float:
    """Trapezoid-rule AP of one ranked list of database indices (module docstring); NaN without positives."""
    ok_arr = np.unique(np.asarray(ok, dtype=np.int64))
    if ok_arr.size == 0:
        return float("nan")
    r = _positive_ranks(np.asarray(ranked, dtype=np.int64), ok_arr, np.asarray(junk, dtype=np.int64))
    j = np.arange(r.size, dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    return float(((p0 + p1) / 2).sum() / ok_arr.size)


def _precision_at(r: np.ndarray, k: int) -> float:
    if r.size == 0:
        return 0.0
    ranks1 = r + 1
    kq = min(int(ranks1.max()), k)
    return float((ranks1 <= kq).sum() / kq)


def revisited_map(ranks: np.ndarray | torch.Tensor, gnd: Sequence[dict],
                  kappas: Sequence[int] = KAPPAS) -> dict[str, dict[str, float]]:
    """mAP and mP@k of ranked lists ``ranks`` (n_queries, K) (database indices, best first) in the three
    settings: ``{"easy": {"mAP": ..., "mP@1": ...}, "medium": ..., "hard": ...}`` (fractions)."""
    ranks = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.int64)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise DinolabError(f"ranks must be (n_queries={len(gnd)}, K), got shape {ranks.shape}")
    out = {}
    for setting in SETTINGS:
        aps, prs = [], []
        for row, g in zip(ranks, setting_ground_truth(gnd, setting), strict=True):
            if g["ok"].size == 0:
                continue
            aps.append(revisited_ap(row, g["ok"], g["junk"]))
            r = _positive_ranks(row, np.unique(g["ok"]), g["junk"])
            prs.append([_precision_at(r, k) for k in kappas])
        res = {"mAP": float(np.mean(aps)) if aps else float("nan"), "queries": len(aps)}
        for n, k in enumerate(kappas):
            res[f"mP@{k}"] = float(np.mean([p[n] for p in prs])) if prs else float("nan")
        out[setting] = res
    return out


def _query_crops(ds: RevisitedDataset) -> list:
    from dinolab.data.images import load_rgb

    crops = []
    for name, g in zip(ds.qimlist, ds.gnd, strict=True):
        img = load_rgb(ds.image_path(name))
        bbx = g.get("bbx")
        crops.append(img.crop(tuple(float(v) for v in bbx)) if bbx is not None and len(bbx) == 4 else img)
    return crops


def evaluate_revisited(
    model: nn.Module,
    root: str | os.PathLike,
    dataset: str,
    *,
    resize: int = 224,
    crop: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Embed ``dataset``'s database and query regions with ``model`` and score the three settings.

    Images go through the classification transform (short side ``resize``, centre crop ``crop``) or,
    with ``crop=None``, the whole image with the short side at ``resize`` and sides rounded to the
    patch size (one image per batch, as sizes differ). Ranking: cosine of the CLS features, full list.
    """
    from dinolab.data.transforms import make_classification_transform, make_dense_transform
    from dinolab.eval.features import extract_features
    from dinolab.eval.neighbours import topk_cosine

    ds = load_revisited(root, dataset)
    missing = [n for n in ds.imlist[:1] + ds.qimlist[:1] if not ds.image_path(n).is_file()]
    if missing:
        raise DinolabError(f"image {ds.image_path(missing[0])} not found; put the dataset's jpg/ folder "
                           f"beside gnd_{dataset}.pkl")
    if crop is None:
        tf, bs = make_dense_transform(getattr(model, "patch_size", 14), short_side=resize), 1
    else:
        tf, bs = make_classification_transform(resize, crop), batch_size
    kw = {"transform": tf, "batch_size": bs, "device": device, "num_workers": num_workers, "progress": progress}
    db = extract_features(model, [ds.image_path(n) for n in ds.imlist], **kw)
    if db.skipped:
        raise DinolabError(f"database image {db.skipped[0][0]} could not be decoded: {db.skipped[0][1]}")
    q = extract_features(model, _query_crops(ds), **kw)
    _, ranks = topk_cosine(q.cls, db.cls, len(ds.imlist), device=device)
    res = revisited_map(ranks, ds.gnd)
    log.info("%s: mAP easy %.2f medium %.2f hard %.2f", dataset, *(100 * res[s]["mAP"] for s in SETTINGS))
    return {"dataset": dataset, "database": len(ds.imlist), "queries": len(ds.qimlist),
            "transform": {"resize": resize, "crop": crop}, **res}
