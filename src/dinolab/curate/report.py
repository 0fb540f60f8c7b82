"""Reports of ``dinolab curate``: report.json / report.md over the stage folders, and the figures
(duplicate pairs with their cosine, cluster-size histograms on log axes)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dinolab.curate.config import STAGES
from dinolab.errors import DinolabError
from dinolab.io import atomic_save_figure, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from dinolab.curate.pipeline import Pool, StageOutcome

__all__ = ["entropy", "pair_figure", "size_plot", "write_summary"]

def pair_figure(pool: Pool, pairs: np.ndarray, sims: np.ndarray, n: int, path: Path) -> None:
    """Up to ``n`` duplicate pairs side by side with their cosine, spread over the similarity range."""
    from matplotlib.figure import Figure

    from dinolab.data.images import load_rgb

    order = np.argsort(sims, kind="stable")
    pick = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    fig = Figure(figsize=(4.0, 2.1 * len(pick)))
    axes = fig.subplots(len(pick), 2, squeeze=False)
    for row, p in enumerate(pick.tolist()):
        for col in range(2):
            ax, r = axes[row][col], int(pairs[p, col])
            ax.set_axis_off()
            try:
                ax.imshow(load_rgb(pool.paths[r]))
            except DinolabError:
                ax.text(0.5, 0.5, "missing", ha="center", va="center")
            ax.set_title((f"cos {sims[p]:.3f}\n" if col == 0 else "\n") + pool.ids[r][-28:], fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def size_plot(sizes: Sequence[np.ndarray], labels: Sequence[str], path: Path, title: str, *, rank: bool) -> None:
    """Log-log histogram of cluster sizes (or, with ``rank``, sizes sorted descending against rank)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    for s, label in zip(sizes, labels, strict=True):
        s = np.asarray(s)
        if rank:
            ax.plot(np.arange(1, s.size + 1), np.sort(s)[::-1], label=label)
        elif (s > 0).any():
            bins = np.logspace(0, math.log10(max(2, int(s.max()) + 1)), 30)
            ax.hist(s[s > 0], bins=bins, histtype="step", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank" if rank else "cluster size (images)")
    ax.set_ylabel("images" if rank else "clusters")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def entropy(counts: np.ndarray) -> float:
    """Natural-log entropy of the distribution given by ``counts``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_summary(out: Path, pool: Pool, outcomes: Sequence[StageOutcome], *, final: StageOutcome | None) -> dict:
    """report.json / report.md over every finished stage folder in ``out``, plus manifest.txt = ``final``'s."""
    ran = {o.name: o for o in outcomes}
    stages = []
    for name in STAGES:
        if name in ran:
            stages.append({**ran[name].report, "reused": ran[name].reused, "this_run": True})
        elif (out / name / "stage.json").is_file():
            stages.append({**json.loads((out / name / "report.json").read_text()), "this_run": False})
    summary = {"pool": {"embeddings": str(pool.embed_dir), "images": len(pool), "model": pool.model_id},
               "stages": stages, "final": None}
    if final is not None:
        manifest = (out / final.name / "manifest.txt").read_text()
        atomic_write_text(out / "manifest.txt", manifest)
        summary["final"] = {"stage": final.name, "images": int(final.rows.size),
                            "manifest": str((out / "manifest.txt").resolve())}
    atomic_write_json(out / "report.json", summary)
    atomic_write_text(out / "report.md", _markdown(out, summary))
    return summary


def _markdown(out: Path, summary: dict) -> str:
    p = summary["pool"]
    lines = [f"# Curation report: {out}", "",
             f"Pool: {p['images']} images from `{p['embeddings']}` (model `{p['model']}`).", "",
             "| stage | in | out | removed | wall (s) | this run |", "|---|---:|---:|---:|---:|---|"]
    for s in summary["stages"]:
        when = ("reused" if s.get("reused") else "computed") if s["this_run"] else "earlier run"
        lines.append(f"| {s['stage']} | {s['n_in']} | {s['n_out']} | {s['removed']} | {s['wall_s']:.1f} | {when} |")
    details = {"dedup": ("pairs", "components", "removed_duplicates", "removed_eval"),
               "select": ("mode", "seeds", "retrieved", "clusters_kept"),
               "cluster": ("ks", "backend", "level1_sizes"),
               "sample": ("n_target", "clusters_covered", "entropy_before", "entropy_after")}
    lines.append("")
    for s in summary["stages"]:
        items = ", ".join(f"{k} {s[k]:.3g}" if isinstance(s[k], float) else f"{k} {s[k]}"
                          for k in details[s["stage"]] if k in s)
        lines.append(f"- **{s['stage']}**: {items}")
    pngs = [f"{n}/{f}" for n, f in (("dedup", "duplicates.png"), ("cluster", "cluster_sizes.png"),
                                    ("sample", "sampled_sizes.png")) if (out / n / f).is_file()]
    lines += [""] + [f"![{png}]({png})" for png in pngs]
    if summary["final"]:
        f = summary["final"]
        lines += ["", (f"Final manifest: `manifest.txt` ({f['images']} images, from the {f['stage']} stage); "
                       "train on it with `dinolab train --data manifest.txt`.")]
    return "\n".join(lines) + "\n"
