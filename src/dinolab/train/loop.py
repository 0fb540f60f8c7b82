"""``dinolab train``: the pretraining loop — schedules, step, EMA, logging, checkpoints, export.

The run folder (``train.output_dir``) holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line
per logged step), ``checkpoints/`` (atomic, keep-last-k; a killed or SIGTERM'd run resumes from the
newest), ``teacher_backbone.pth`` (official layout, loadable with ``dinolab.load_model``),
``loss.png`` and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dinolab.config import Config, config_to_dict, iters_per_epoch, save_config
from dinolab.errors import DinolabError
from dinolab.io import atomic_write_json
from dinolab.models.checkpoints import save_official
from dinolab.train.build import (
    build_arch,
    build_augmentation,
    build_optimizer,
    build_training_schedules,
    mask_grid,
)
from dinolab.train.checkpointing import GracefulExit, latest_checkpoint, load_checkpoint, save_checkpoint
from dinolab.train.data import make_loader, training_items
from dinolab.train.monitor import CollapseMonitor, plot_losses
from dinolab.train.optim import apply_schedules

log = logging.getLogger(__name__)
MAX_NONFINITE = 10  # consecutive non-finite losses before the run stops


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _resume(run_dir: Path, arch, optimizer) -> int:
    """Load the newest checkpoint of ``run_dir`` (models, optimizer, centering, RNG); its iteration."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    state = load_checkpoint(path)
    arch.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed from %s (iteration %d)", path, state["iteration"])
    return int(state["iteration"])


class KnnMonitor:
    """Periodic kNN accuracy of the teacher backbone on a labelled (train, test) pair (k=20, T=0.07)."""

    def __init__(self, train_spec: str, test_spec: str, crop: int, run_dir: Path) -> None:
        from dinolab.data.datasets import resolve_dataset

        self.train, self.test = resolve_dataset(train_spec), resolve_dataset(test_spec)
        self.resize = crop if crop <= 64 else round(crop * 256 / 224)  # small images: no resize margin
        self.crop, self.path, self.history = crop, run_dir / "knn.jsonl", []

    def __call__(self, backbone: torch.nn.Module, iteration: int) -> float:
        from dinolab.eval.jobs import run_knn

        res = run_knn(backbone, self.train, self.test, ks=(20,), resize=self.resize, crop=self.crop,
                      progress=False, model_id=f"teacher@{iteration}")
        row = {"iteration": iteration, "knn_top1": res["top1"]["20"], "knn_top5": res["top5"]["20"]}
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("iteration %d: kNN (k=20) top-1 %.2f", iteration, row["knn_top1"])
        return row["knn_top1"]


def train(cfg: Config, data: str, *, device: str | None = None, progress: bool = True,
          eval_train: str | None = None, eval_test: str | None = None) -> dict:
    """Pretrain on the images of ``data`` (folder, list file, or ``cifar10:train``); see module doc.

    With ``eval_train`` and ``eval_test`` (dataset specs, e.g. ``cifar10:train`` / ``cifar10:test``)
    the teacher is evaluated by kNN every ``train.eval_every`` iterations and at the end.
    """
    from tqdm.auto import tqdm

    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)
    items = training_items(data)
    ipe = iters_per_epoch(cfg, len(items))
    schedules = build_training_schedules(cfg, ipe)
    arch = build_arch(cfg).to(dev)
    optimizer = build_optimizer(cfg, arch)
    start = _resume(run_dir, arch, optimizer)
    total = schedules.total_iters
    if start >= total:
        log.info("run already finished (%d iterations)", total)
        return json.loads((run_dir / "results.json").read_text())
    batches = make_loader(items, build_augmentation(cfg), batch_size=cfg.train.batch_size_per_gpu,
                          grid=mask_grid(cfg), mask_probability=cfg.mask.probability, mask_ratio=cfg.mask.ratio,
                          seed=cfg.train.seed, start=start, num_workers=cfg.train.num_workers,
                          pin_memory=dev.type == "cuda")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision) if dev.type == "cuda" else None
    monitor = CollapseMonitor(out_dim=cfg.head.out_dim)
    knn = KnnMonitor(eval_train, eval_test, cfg.crops.global_size, run_dir) if eval_train and eval_test else None
    student_params = [p for p in arch.student.parameters() if p.requires_grad]
    nonfinite, skipped_images, t0 = 0, 0, time.perf_counter()
    log.info("training %d iterations (%d per epoch) on %d images, %s", total - start, ipe, len(items), dev)
    with GracefulExit() as stop, tqdm(total=total, initial=start, disable=not progress, unit="it") as bar, \
            (run_dir / "metrics.jsonl").open("a") as metrics_file:
        for it in range(start, total):
            batch = _move(next(batches), dev)
            skipped_images += int(batch.pop("n_skipped"))
            v = schedules.at(it)
            apply_schedules(optimizer, v.lr, v.wd, v.last_layer_lr)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, amp) if amp else nullcontext():
                loss, m = arch.forward_backward(batch, teacher_temp=v.teacher_temp)
            if not math.isfinite(loss.item()):
                nonfinite += 1
                log.warning("non-finite loss at iteration %d (%d in a row): step skipped", it, nonfinite)
                if nonfinite >= MAX_NONFINITE:
                    raise DinolabError(f"{nonfinite} non-finite losses in a row at iteration {it}: lower "
                                       "optim.base_lr, raise optim.warmup_epochs, or use train.precision=fp32")
                continue
            nonfinite = 0
            if cfg.optim.clip_grad:
                m["grad_norm"] = torch.nn.utils.clip_grad_norm_(student_params, cfg.optim.clip_grad).item()
            optimizer.step()
            arch.update_teacher(v.momentum)
            monitor.update(it, m)
            m.update(iteration=it + 1, lr=v.lr, wd=v.wd, momentum=v.momentum, teacher_temp=v.teacher_temp,
                     images_per_s=(it + 1 - start) * cfg.train.batch_size_per_gpu / (time.perf_counter() - t0))
            if (it + 1) % max(cfg.train.log_every, 1) == 0 or it + 1 == total:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", dino=f"{m['dino']:.3f}", ibot=f"{m['ibot']:.3f}",
                                lr=f"{v.lr:.1e}", img_s=f"{m['images_per_s']:.0f}")
            bar.update()
            if knn and cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0 and it + 1 < total:
                knn(arch.teacher["backbone"], it + 1)
            every = cfg.train.checkpoint_every
            if stop.requested or it + 1 == total or (every and (it + 1) % every == 0):
                save_checkpoint(run_dir, it + 1, {"model": arch.state_dict(), "optimizer": optimizer.state_dict(),
                                                  "config": config_to_dict(cfg)}, keep_last=cfg.train.keep_last)
            if stop.requested:
                log.warning("stop requested: checkpoint saved at iteration %d; run the same command to resume", it + 1)
                return {"stopped_at": it + 1}
    train_seconds = time.perf_counter() - t0
    if knn:
        knn(arch.teacher["backbone"], total)
    return _finish(run_dir, arch, monitor, total, skipped_images, train_seconds, knn)


def _finish(run_dir: Path, arch, monitor, total: int, skipped_images: int, seconds: float,
            knn: KnnMonitor | None) -> dict:
    """Export the teacher backbone, plot the losses, write results.json."""
    export = save_official(arch.teacher["backbone"], run_dir / "teacher_backbone.pth")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    results = {"iterations": total, "teacher_backbone": str(export), "skipped_images": skipped_images,
               "train_wall_s_this_session": seconds, **monitor.summary()}
    if knn:
        results["knn"] = knn.history
    atomic_write_json(run_dir / "results.json", results)
    for warning in monitor.warnings:
        log.warning(warning)
    log.info("exported %s", export)
    return results
