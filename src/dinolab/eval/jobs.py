"""Classification evaluation jobs: the entry functions behind ``dinolab eval knn|linear|logreg``.

Each job takes a backbone (in memory: the pretraining loop calls these for periodic evaluation),
train/test ``LabeledImages`` and plain options; it returns a results dict and, given ``out_dir``,
writes a run folder::

    results.json             all numbers, the options, model id, dataset hashes, wall times; per split
                             ``n_listed`` (images given), ``n_scored`` (decoded and used; None for the
                             linear probe's train split), ``n_skipped`` (undecodable) and ``n``
                             (= ``n_listed``, kept for older readers)
    confusion_matrix.png     of the headline classifier on the test split
    per_class.json           per-class accuracy of that classifier

Configs and names are resolved at the edge (``dinolab.cli``), not here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dinolab.data.datasets import LabeledImages
from dinolab.data.transforms import make_classification_transform
from dinolab.distributed import get_rank
from dinolab.errors import DinolabError
from dinolab.eval.features import extract_features
from dinolab.eval.metrics import confusion_matrix, per_class_accuracy, plot_confusion_matrix
from dinolab.io import atomic_write_json, json_safe

log = logging.getLogger(__name__)


def dataset_hash(ds: LabeledImages) -> str:
    """SHA-256 (first 16 hex) of the ids and labels: the same images in the same order hash alike."""
    h = hashlib.sha256()
    for i, y in zip(ds.ids, ds.labels.tolist()):
        h.update(f"{i}\t{y}\n".encode())
    return h.hexdigest()[:16]


def labeled_features(model: nn.Module, ds: LabeledImages, *, resize: int, crop: int, batch_size: int = 256,
                     device: str | None = None, num_workers: int = 0, progress: bool = True
                     ) -> tuple[Tensor, Tensor]:
    """CLS features (N', D) and labels (N',) of the images that decoded (bad ones are dropped, logged)."""
    feats = extract_features(model, ds, transform=make_classification_transform(resize, crop),
                             batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    pos = {id_: i for i, id_ in enumerate(ds.ids)}
    rows = torch.as_tensor([pos[i] for i in feats.ids], dtype=torch.long)
    if len(rows) == 0:
        raise DinolabError(f"none of the {len(ds)} images could be decoded")
    return feats.cls, torch.as_tensor(ds.labels)[rows]


def write_run(out_dir: str | Path | None, results: dict, preds: Tensor, labels: Tensor,
              classes: list[str], title: str) -> dict:
    """Add confusion-matrix statistics to ``results`` and, with ``out_dir``, write the run folder."""
    cm = confusion_matrix(preds, labels, len(classes))
    per_class = json_safe(dict(zip(classes, per_class_accuracy(cm).tolist())))  # null: no test image of a class
    results["per_class_top1"] = per_class
    if out_dir is not None and get_rank() == 0:  # under torchrun every rank has the results; one writes
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion_matrix(cm, classes, out / "confusion_matrix.png", title=title)
        atomic_write_json(out / "per_class.json", per_class)
        atomic_write_json(out / "results.json", results)
        log.info("wrote %s", out / "results.json")
    return results


def counts(n_listed: int, n_scored: int | None) -> dict[str, int | None]:
    """How many images a split listed, how many were scored (decoded and used), how many were skipped;
    ``n`` repeats ``n_listed`` for readers of older results files."""
    skipped = None if n_scored is None else n_listed - n_scored
    return {"n": n_listed, "n_listed": n_listed, "n_scored": n_scored, "n_skipped": skipped}


def _header(task: str, model_id: str, train: LabeledImages, test: LabeledImages, options: dict) -> dict:
    return {"task": task, "model": model_id, "options": options,
            "train": {**counts(len(train), None), "hash": dataset_hash(train), "classes": len(train.classes)},
            "test": {**counts(len(test), None), "hash": dataset_hash(test)}}


def _scored(res: dict, n_train: int | None, n_test: int) -> None:
    res["train"].update(counts(res["train"]["n_listed"], n_train))
    res["test"].update(counts(res["test"]["n_listed"], n_test))


def _check_classes(train: LabeledImages, test: LabeledImages) -> None:
    if train.classes != test.classes:
        raise DinolabError(f"train and test splits have different classes ({len(train.classes)} vs "
                           f"{len(test.classes)}: {train.classes[:3]}... vs {test.classes[:3]}...)")


def run_knn(model: nn.Module, train: LabeledImages, test: LabeledImages, *, model_id: str = "in-memory",
            ks: tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07, resize: int = 256,
            crop: int = 224, batch_size: int = 256, device: str | None = None, num_workers: int = 0,
            out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """DINOv2 kNN evaluation; headline = top-1 at k=20 (or the closest k given)."""
    from dinolab.eval.knn import knn_classify

    _check_classes(train, test)
    opts = {"ks": list(ks), "temperature": temperature, "resize": resize, "crop": crop}
    res = _header("knn", model_id, train, test, opts)
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = (labeled_features(model, ds, resize=resize, crop=crop, batch_size=batch_size,
                                              device=device, num_workers=num_workers, progress=progress)
                              for ds in (train, test))
    t1 = time.perf_counter()
    _scored(res, len(ytr), len(yte))
    knn = knn_classify(xtr, ytr, xte, test_labels=yte, num_classes=len(train.classes), ks=ks,
                       temperature=temperature, device=device)
    k_head = min(ks, key=lambda k: abs(k - 20))
    res.update(top1={str(k): v for k, v in knn.top1.items()}, top5={str(k): v for k, v in knn.top5.items()},
               headline={"metric": f"top1@k={k_head}", "value": knn.top1[k_head]},
               wall_s={"features": t1 - t0, "knn": time.perf_counter() - t1})
    return write_run(out_dir, res, knn.predictions[k_head], yte, train.classes, f"kNN k={k_head}")


def run_logreg(model: nn.Module, train: LabeledImages, test: LabeledImages, *, model_id: str = "in-memory",
               resize: int = 256, crop: int = 224, batch_size: int = 256, device: str | None = None,
               num_workers: int = 0, val_fraction: float = 0.2, seed: int = 0,
               out_dir: str | Path | None = None, progress: bool = True, **grid_kw: Any) -> dict:
    """Logistic regression on frozen CLS features, C chosen on a held-out part of train."""
    from dinolab.eval.logreg import logreg_grid

    _check_classes(train, test)
    res = _header("logreg", model_id, train, test, {"resize": resize, "crop": crop, "val_fraction": val_fraction,
                                                     "seed": seed, **grid_kw})
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = (labeled_features(model, ds, resize=resize, crop=crop, batch_size=batch_size,
                                              device=device, num_workers=num_workers, progress=progress)
                              for ds in (train, test))
    t1 = time.perf_counter()
    _scored(res, len(ytr), len(yte))
    lr = logreg_grid(xtr, ytr, xte, yte, num_classes=len(train.classes), val_fraction=val_fraction, seed=seed,
                     device=device, **grid_kw)
    res.update(_asdict(lr, drop=("predictions", "model")),
               wall_s={"features": t1 - t0, "logreg": time.perf_counter() - t1})
    res["val_top1"] = {str(c): v for c, v in lr.val_top1.items()}
    res["headline"] = {"metric": "top1 (C chosen on held-out train)", "value": lr.top1}
    return write_run(out_dir, res, lr.predictions, yte, train.classes, "logistic regression")


def run_linear(model: nn.Module, train: LabeledImages, test: LabeledImages, *, model_id: str = "in-memory",
               out_dir: str | Path | None = None, **probe_kw: Any) -> dict:
    """DINOv2 linear probe grid; headline = the held-out-selected classifier's test top-1."""
    from dinolab.eval.linear import linear_probe

    _check_classes(train, test)
    res = _header("linear", model_id, train, test, {k: v for k, v in probe_kw.items() if k != "progress"})
    t0 = time.perf_counter()
    lin = linear_probe(model, train, test, **probe_kw)
    res.update(grid=lin.grid, held_out=lin.held_out, official=lin.official, wall_s={"total": time.perf_counter() - t0})
    res["headline"] = {"metric": "top1 (held-out selection)", "value": lin.held_out["test_top1"]}
    if out_dir is not None and get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(lin.classifier_state, Path(out_dir) / "classifier.pth")
    ok = lin.test_predictions >= 0  # -1 marks test images that could not be decoded
    _scored(res, None, int(ok.sum()))  # train: the probe decodes it anew each epoch, no one count
    labels = torch.as_tensor(test.labels)[ok]
    return write_run(out_dir, res, lin.test_predictions[ok], labels, train.classes, "linear (held-out choice)")


def _asdict(obj: Any, drop: tuple[str, ...] = ()) -> dict:
    """Dataclass fields as JSON-friendly values (tensors/arrays -> lists), minus ``drop``."""
    out = {}
    for k, v in vars(obj).items():
        if k in drop:
            continue
        if isinstance(v, (Tensor, np.ndarray)):
            v = v.tolist()
        out[k] = v
    return out


def format_table(res: dict) -> str:
    """A compact text table of a job's results, printed at the end of ``dinolab eval``."""
    def n(split: dict) -> str:
        scored, skipped = split.get("n_scored"), split.get("n_skipped")
        return f"{split['n'] if scored is None else scored}" + (f" ({skipped} skipped)" if skipped else "")

    lines = [f"{res['task']} | model {res['model']} | train {n(res['train'])} | test {n(res['test'])}"]
    if res["task"] == "knn":
        lines += [f"  k={k:>4s}  top1 {res['top1'][k]:6.2f}  top5 {res['top5'][k]:6.2f}" for k in res["top1"]]
    elif res["task"] == "linear":
        for mode in ("held_out", "official"):
            r = res[mode]
            cfg = ", ".join(f"{k}={r[k]}" for k in ("lr", "n_blocks", "avgpool") if k in r)
            lines.append(f"  {mode:9s} top1 {r['test_top1']:6.2f}  ({cfg})")
    else:
        lines.append(f"  top1 {res['headline']['value']:6.2f}  top5 {res['top5']:6.2f}  (C={res['best_C']:g})")
    return "\n".join(lines)
