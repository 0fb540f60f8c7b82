"""The curation pipeline behind ``dinolab curate``: embed -> dedup -> select -> cluster -> sample.

Each stage reads pool rows (indices into the embed folder), writes its own folder and can run alone::

    <out>/config.yaml            resolved options of the last `run`
    <out>/embed/                 `dinolab embed` output when the run starts from images
    <out>/<stage>/rows.npy       kept rows (int64, ascending) of the embed folder
    <out>/<stage>/manifest.txt   their image paths, one per line (`dinolab train --data` reads it)
    <out>/<stage>/report.json    counts in / out / removed, wall time, stage details
    <out>/<stage>/stage.json     fingerprint of the inputs and options, written last (= stage done)
    dedup/   removed.tsv (id, reason, duplicate-of / eval set), pairs.tsv, duplicates.png
    select/  hits.npy (how many seeds retrieved each input row)
    cluster/ tree.npz (centroids + assignments per level), clusters.tsv, cluster_sizes.png
    sample/  sampled_sizes.png (leaf-cluster sizes before / after)
    <out>/report.json, report.md, manifest.txt   summary of the stages and the final manifest

Input of a stage run alone: ``input_manifest`` if given, else the rows of the latest finished
earlier stage in the same run folder (dedup < select < cluster), else the whole pool; ``sample``
always takes the cluster stage's tree. A stage whose fingerprint (pool, input rows, options, seed,
seed / evaluation sets) matches its ``stage.json`` is not recomputed; change anything and it and
the stages after it run again. Results are deterministic for a fixed ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from dinolab.curate.config import (
    STAGES,
    ClusterOptions,
    CurateConfig,
    DedupOptions,
    SampleOptions,
    SelectOptions,
    config_to_dict,
)
from dinolab.curate.embed import load_embedded, read_embed_folder
from dinolab.curate.report import entropy, pair_figure, size_plot, write_summary
from dinolab.errors import DinolabError
from dinolab.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["STAGES", "Pool", "StageOutcome", "auto_ks", "read_manifest_rows", "run_pipeline", "run_stage",
           "write_summary"]



# ----------------------------------------------------------------------------------------- pool


@dataclass
class Pool:
    """The embedded pool: ids, image paths and (memory-mapped) features of one embed folder."""

    embed_dir: Path
    ids: list[str]
    paths: list[str]
    features: np.ndarray
    model_id: str
    fingerprint: str

    @classmethod
    def open(cls, embed_dir: str | os.PathLike, *, key: str = "cls", images_root: str | None = None) -> Pool:
        """Open a finished embed folder; image paths = ``images_root`` (default: its recorded id_root) / id."""
        ids, features, meta = load_embedded(embed_dir, key)
        root = images_root or meta.get("id_root")
        if root is None:
            raise DinolabError(f"{embed_dir} does not record which folder its ids are relative to (embedded by an "
                               "older dinolab); pass --images-root (images_root:) so manifests hold real paths")
        paths = [os.path.normpath(os.path.join(root, i)) for i in ids]
        fp = _digest({"ids": meta.get("ids_sha256"), "count": len(ids), "model": meta.get("model_id"), "key": key,
                      "created": meta.get("created"), "root": str(root)})
        return cls(Path(embed_dir), ids, paths, features, str(meta.get("model_id", "")), fp)

    def __len__(self) -> int:
        return len(self.ids)

    def feats(self, rows: np.ndarray) -> torch.Tensor:
        """L2-normalised float32 features of ``rows`` (K, D)."""
        return F.normalize(torch.from_numpy(np.array(self.features[rows], dtype=np.float32)), dim=1)


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _other_features(embed_dir: str, pool: Pool, key: str, what: str) -> tuple[torch.Tensor, str]:
    """Normalised features of another embed folder (seeds, an evaluation set) and its fingerprint."""
    ids, arrays, meta = read_embed_folder(embed_dir, mmap=True)
    if key not in arrays or not ids:
        raise DinolabError(f"{what} folder {embed_dir} holds no '{key}' features")
    if arrays[key].shape[1] != pool.features.shape[1]:
        raise DinolabError(f"{what} features in {embed_dir} are {arrays[key].shape[1]}-d, the pool's "
                           f"{pool.features.shape[1]}-d: embed both with the same model")
    if meta.get("model_id") and pool.model_id and meta["model_id"] != pool.model_id:
        log.warning("%s %s was embedded with %s, the pool with %s: similarities are only meaningful for "
                    "the same model", what, embed_dir, meta["model_id"], pool.model_id)
    feats = F.normalize(torch.from_numpy(np.array(arrays[key], dtype=np.float32)), dim=1)
    return feats, _digest({"ids": meta.get("ids_sha256"), "created": meta.get("created"), "key": key})


def read_manifest_rows(manifest: str | os.PathLike, pool: Pool) -> np.ndarray:
    """Pool rows (ascending) of the images a list file names; an image outside the pool is an error."""
    from dinolab.data.images import list_images_with_ids

    paths, _ = list_images_with_ids(manifest)
    where = {p: i for i, p in enumerate(pool.paths)}
    rows, missing = [], []
    for p in paths:
        r = where.get(os.path.normpath(os.path.abspath(p)))
        (missing if r is None else rows).append(p if r is None else r)
    if missing:
        raise DinolabError(f"{len(missing)} images of {manifest} are not in the pool {pool.embed_dir} "
                           f"(e.g. {missing[0]}); a manifest must come from the same embed folder")
    return np.unique(np.asarray(rows, dtype=np.int64))


# ----------------------------------------------------------------------------------- stage frame


@dataclass
class StageOutcome:
    """What one stage kept (``rows`` of the pool), its report, and whether it was reused from disk."""

    name: str
    rows: np.ndarray
    report: dict
    reused: bool


Compute = Callable[[Path, np.ndarray], tuple[np.ndarray, dict]]


def _stage_done(folder: Path, fingerprint: str) -> bool:
    done = folder / "stage.json"
    return (done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint
            and all((folder / f).is_file() for f in ("rows.npy", "manifest.txt", "report.json")))


def _run(out: Path, name: str, pool: Pool, rows_in: np.ndarray, options: object, compute: Compute, *,
         seed: int, extra: dict | None = None) -> StageOutcome:
    """Run ``compute(folder, rows_in) -> (rows_out, details)`` unless the same inputs are already done."""
    folder = out / name
    parts = {"stage": name, "options": asdict(options), "pool": pool.fingerprint, "input": _rows_digest(rows_in),
             "seed": seed, **(extra or {})}
    fp = _digest(parts)
    if _stage_done(folder, fp):
        log.info("%s: inputs and options unchanged, reusing %s", name, folder)
        return StageOutcome(name, np.load(folder / "rows.npy"), json.loads((folder / "report.json").read_text()), True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    rows, details = compute(folder, rows_in)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    report = {"stage": name, "n_in": int(rows_in.size), "n_out": int(rows.size),
              "removed": int(rows_in.size - rows.size), "wall_s": round(time.perf_counter() - t0, 3),
              "manifest": str((folder / "manifest.txt").resolve()), **details}
    atomic_write(folder / "rows.npy", lambda f: np.save(f, rows))
    atomic_write_text(folder / "manifest.txt", "".join(pool.paths[r] + "\n" for r in rows.tolist()))
    atomic_write_json(folder / "report.json", report)
    atomic_write_json(folder / "stage.json", {"fingerprint": fp, "inputs": parts})  # last: the stage is done
    log.info("%s: %d -> %d images (%.1f s), %s", name, rows_in.size, rows.size, report["wall_s"], folder)
    return StageOutcome(name, rows, report, False)


def _device(cfg: CurateConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------- dedup


def _dedup(pool: Pool, opts: DedupOptions, cfg: CurateConfig, progress: bool) -> tuple[Compute, dict]:
    from dinolab.curate.dedup import find_duplicates, remove_near_eval

    evals = [_other_features(e, pool, cfg.key, "evaluation set") for e in opts.eval]

    def compute(folder: Path, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        feats = pool.feats(rows)
        res = find_duplicates(feats, threshold=opts.threshold, k=opts.k, method=opts.method, nlist=opts.nlist,
                              nprobe=opts.nprobe, device=_device(cfg), progress=progress)
        eval_hit = np.zeros(rows.size, dtype=bool)
        per_eval = {}
        for name, (ev, _) in zip(opts.eval, evals, strict=True):
            near = ~remove_near_eval(feats, ev, threshold=opts.eval_threshold or opts.threshold, device=_device(cfg))
            per_eval[name] = int(near.sum())
            eval_hit |= near
        lines = [f"{pool.ids[rows[m]]}\tduplicate\t{pool.ids[rows[c[0]]]}\n" for c in res.components for m in c[1:]]
        lines += [f"{pool.ids[r]}\teval\t-\n" for r in rows[res.keep & eval_hit].tolist()]
        atomic_write_text(folder / "removed.tsv", "".join(lines))
        pairs = rows[res.pairs] if len(res.pairs) else res.pairs
        atomic_write_text(folder / "pairs.tsv", "".join(f"{pool.ids[a]}\t{pool.ids[b]}\t{s:.4f}\n" for (a, b), s
                                                        in zip(pairs.tolist(), res.similarities.tolist())))
        if len(pairs) and opts.examples > 0:
            pair_figure(pool, pairs, res.similarities, opts.examples, folder / "duplicates.png")
        details = {"threshold": opts.threshold, "method": opts.method, "pairs": len(res.pairs),
                   "components": len(res.components), "removed_duplicates": res.n_removed,
                   "removed_eval": int((res.keep & eval_hit).sum()), "eval_matches": per_eval}
        return rows[res.keep & ~eval_hit], details

    return compute, {"eval": [fp for _, fp in evals]}


# ---------------------------------------------------------------------------------------- select


def _select(pool: Pool, opts: SelectOptions, cfg: CurateConfig, progress: bool) -> tuple[Compute, dict]:
    from dinolab.curate.selection import select_by_retrieval

    if not opts.seeds:
        raise DinolabError("the select stage needs seed images: select.seeds (--seeds) = an embed folder of them")
    seeds, seeds_fp = _other_features(opts.seeds, pool, cfg.key, "seed")

    def compute(folder: Path, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        res = select_by_retrieval(pool.feats(rows), seeds, mode=opts.mode, k=opts.k,
                                  min_similarity=opts.min_similarity, n_clusters=opts.n_clusters,
                                  per_cluster=opts.per_cluster, min_hits=opts.min_hits,
                                  kmeans_backend=cfg.cluster.backend, index_kind=opts.index, seed=cfg.seed,
                                  device=_device(cfg), progress=progress)
        atomic_write(folder / "hits.npy", lambda f: np.save(f, res.hits))
        details = {"mode": res.mode, "seeds": int(seeds.shape[0]), "k": opts.k,
                   "retrieved": int((res.hits > 0).sum())}
        if res.clusters is not None:
            details.update(n_clusters=int(res.cluster_hits.size), clusters_kept=int(res.clusters.size))
        return rows[res.selected], details

    return compute, {"seeds": seeds_fp}


# --------------------------------------------------------------------------------------- cluster


def auto_ks(n: int) -> list[int]:
    """Default tree for n points: two levels, round(sqrt(n)) and round(n^(1/4)) clusters (at least 1)."""
    return [max(1, round(math.sqrt(n))), max(1, round(n ** 0.25))]


def _cluster(pool: Pool, opts: ClusterOptions, cfg: CurateConfig, progress: bool) -> tuple[Compute, dict]:
    from dinolab.curate.kmeans import hierarchical_kmeans, point_assignments

    def compute(folder: Path, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        ks = list(opts.ks) if opts.ks else auto_ks(rows.size)
        if ks[0] > rows.size:
            raise DinolabError(f"cluster.ks[0]={ks[0]} is more than the {rows.size} images left; lower cluster.ks")
        levels = hierarchical_kmeans(pool.feats(rows), ks, n_iter=opts.n_iter, seed=cfg.seed, device=_device(cfg),
                                     spherical=opts.spherical, progress=progress, backend=opts.backend)
        arrays = {"rows": rows, "distances": levels[0].distances.cpu().numpy()}
        for lvl, res in enumerate(levels):
            arrays[f"centroids{lvl}"] = res.centroids.float().cpu().numpy()
            arrays[f"assignments{lvl}"] = res.assignments.cpu().numpy()
        atomic_write(folder / "tree.npz", lambda f: np.savez(f, **arrays))
        per_point = [a.cpu().numpy() for a in point_assignments(levels)]
        atomic_write_text(folder / "clusters.tsv", "".join(
            pool.ids[r] + "".join(f"\t{a[i]}" for a in per_point) + "\n" for i, r in enumerate(rows.tolist())))
        sizes = [np.bincount(a, minlength=k) for a, k in zip(per_point, ks, strict=True)]
        size_plot(sizes, [f"level {i + 1} (k={k})" for i, k in enumerate(ks)], folder / "cluster_sizes.png",
                   f"cluster sizes, {rows.size} images", rank=False)
        details = {"ks": ks, "backend": opts.backend, "inertia": [r.inertia for r in levels],
                   "iterations": [r.n_iter_run for r in levels],
                   "level1_sizes": {"min": int(sizes[0].min()), "median": float(np.median(sizes[0])),
                                    "max": int(sizes[0].max()), "empty": int((sizes[0] == 0).sum())}}
        return rows, details

    return compute, {}


# ---------------------------------------------------------------------------------------- sample


def _load_tree(folder: Path) -> tuple[np.ndarray, list]:
    from dinolab.curate.kmeans import KMeansResult

    with np.load(folder / "tree.npz") as z:
        n_levels = sum(1 for k in z.files if k.startswith("centroids"))
        levels = [KMeansResult(centroids=torch.from_numpy(z[f"centroids{i}"]),
                               assignments=torch.from_numpy(z[f"assignments{i}"]), inertia=0.0, n_iter_run=0,
                               distances=torch.from_numpy(z["distances"]) if i == 0 else None)
                  for i in range(n_levels)]
        return z["rows"], levels


def _sample(pool: Pool, opts: SampleOptions, cfg: CurateConfig, out: Path) -> tuple[Compute, dict]:
    from dinolab.curate.sampling import balanced_sample

    tree_dir = out / "cluster"
    if not (tree_dir / "stage.json").is_file():
        raise DinolabError(f"sampling needs the cluster stage's tree: run `dinolab curate cluster --out {out}` first")
    if opts.n is None or opts.n < 1:
        raise DinolabError("sample.n (--n) must say how many images to keep (>= 1)")
    tree_fp = json.loads((tree_dir / "stage.json").read_text())["fingerprint"]

    def compute(folder: Path, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        tree_rows, levels = _load_tree(tree_dir)
        idx = balanced_sample(levels, opts.n, seed=cfg.seed, strategy=opts.strategy)
        leaf = levels[0].assignments.numpy()
        k = int(levels[0].centroids.shape[0])
        before, after = np.bincount(leaf, minlength=k), np.bincount(leaf[idx], minlength=k)
        size_plot([before, after], ["before sampling", f"after (n={idx.size})"], folder / "sampled_sizes.png",
                   "level-1 cluster sizes, largest first", rank=True)
        details = {"n_target": opts.n, "strategy": opts.strategy, "clusters": k,
                   "clusters_covered": int((after > 0).sum()),
                   "entropy_before": entropy(before), "entropy_after": entropy(after), "entropy_max": math.log(k)}
        return tree_rows[idx], details

    return compute, {"tree": tree_fp}


# ------------------------------------------------------------------------------------ orchestration


def _enabled(cfg: CurateConfig, name: str) -> bool:
    if name == "select":
        return cfg.select.enabled if cfg.select.enabled is not None else bool(cfg.select.seeds)
    if name == "sample":
        return cfg.sample.enabled and cfg.sample.n is not None
    return bool(getattr(cfg, name).enabled)


def _one(name: str, pool: Pool, rows: np.ndarray, cfg: CurateConfig, out: Path, progress: bool) -> StageOutcome:
    builders = {"dedup": lambda: _dedup(pool, cfg.dedup, cfg, progress),
                "select": lambda: _select(pool, cfg.select, cfg, progress),
                "cluster": lambda: _cluster(pool, cfg.cluster, cfg, progress),
                "sample": lambda: _sample(pool, cfg.sample, cfg, out)}
    compute, extra = builders[name]()
    return _run(out, name, pool, rows, getattr(cfg, name), compute, seed=cfg.seed, extra=extra)


def _open_pool(cfg: CurateConfig) -> Pool:
    if not cfg.embeddings:
        raise DinolabError("no pool: pass --embeddings (a `dinolab embed` folder) or, for `run`, --images and --model")
    return Pool.open(cfg.embeddings, key=cfg.key, images_root=cfg.images_root)


def _previous_rows(out: Path, name: str, pool: Pool) -> tuple[np.ndarray, str]:
    """Rows of the latest finished stage before ``name`` in ``out``, else the whole pool."""
    for prev in reversed(STAGES[: STAGES.index(name)]):
        if prev != "sample" and (out / prev / "stage.json").is_file():
            return np.load(out / prev / "rows.npy"), prev
    return np.arange(len(pool), dtype=np.int64), "pool"


def run_stage(name: str, cfg: CurateConfig, *, input_manifest: str | os.PathLike | None = None,
              progress: bool = True) -> dict:
    """Run one stage alone (``dinolab curate dedup|select|cluster|sample``) and rewrite the summary."""
    if name not in STAGES:
        raise DinolabError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    out, pool = Path(cfg.out), _open_pool(cfg)
    if name == "sample":
        if input_manifest is not None:
            raise DinolabError("sample draws from the cluster stage's tree; it takes no --input")
        rows, source = (np.load(out / "cluster" / "rows.npy"), "cluster") if (out / "cluster" / "rows.npy").is_file() \
            else (np.zeros(0, np.int64), "none")
    elif input_manifest is not None:
        rows, source = read_manifest_rows(input_manifest, pool), str(input_manifest)
    else:
        rows, source = _previous_rows(out, name, pool)
    log.info("%s: input %d images from %s", name, rows.size, source)
    outcome = _one(name, pool, rows, cfg, out, progress)
    return write_summary(out, pool, [outcome], final=outcome)


def run_pipeline(cfg: CurateConfig, *, model: nn.Module | None = None, model_id: str = "",
                 progress: bool = True) -> dict:
    """``dinolab curate run``: embed (when ``cfg.images`` is set), then every enabled stage in order.

    Under torchrun only the embedding is sharded; the other stages run on rank 0 (the others return
    ``{}`` after the embedding).
    """
    from dinolab.distributed import get_rank

    out = Path(cfg.out)
    if cfg.images and not cfg.embeddings:
        from dinolab.curate.embed import embed
        from dinolab.data.transforms import make_classification_transform

        if model is None:
            raise DinolabError("embedding the images needs a model: pass --model (and --weights if needed)")
        e = cfg.embed
        embed(model, cfg.images, out / "embed", model_id=model_id, batch_size=e.batch_size,
              transform=make_classification_transform(e.resize, e.crop), num_workers=e.num_workers,
              device=cfg.device, pooling=(cfg.key,), shard_size=e.shard_size, progress=progress)
        cfg.embeddings = str(out / "embed")
    if get_rank() != 0:
        return {}
    pool = _open_pool(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    rows, outcomes = np.arange(len(pool), dtype=np.int64), []
    names = [n for n in STAGES if _enabled(cfg, n)]
    if "sample" in names and "cluster" not in names:
        raise DinolabError("the sample stage draws from the cluster tree: enable cluster (cluster.enabled=true)")
    for name in tqdm(names, desc="curate", unit="stage", disable=not progress):
        outcome = _one(name, pool, rows, cfg, out, progress)
        outcomes.append(outcome)
        rows = outcome.rows
    return write_summary(out, pool, outcomes, final=outcomes[-1] if outcomes else None)
