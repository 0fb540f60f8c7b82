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
from dataclasses import dataclass
from pathlib import Path

import torch

from dinolab.config import Config, config_to_dict, iters_per_epoch, save_config
from dinolab.distributed import all_reduce_sum, get_rank, get_world_size, init_distributed
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
from dinolab.train.monitor import CollapseMonitor, KnnMonitor, plot_losses
from dinolab.train.optim import apply_schedules
from dinolab.train.parallelize import full_state, is_sharded, load_full_state, parallelize, unwrap

log = logging.getLogger(__name__)
MAX_NONFINITE = 10  # consecutive non-finite losses before the run stops


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _resume(run_dir: Path, arch, optimizer, rank: int, world: int, seed: int) -> int:
    """Load the newest checkpoint of ``run_dir`` (models, optimizer, centering, RNG); its iteration.

    One process restores the saved RNG exactly; with several, each rank re-seeds from
    (seed, rank, iteration) instead (the checkpoint holds rank 0's RNG only)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    state = load_checkpoint(path, restore_rng=world == 1)
    load_full_state(arch, state["model"], optimizer, state["optimizer"])
    if world > 1:
        torch.manual_seed(seed + 1000 * int(state["iteration"]) + rank)
    log.info("resumed from %s (iteration %d)", path, state["iteration"])
    return int(state["iteration"])


@dataclass
class _Run:
    """Everything a training run holds; built once by ``_setup``."""

    cfg: Config
    run_dir: Path
    dev: torch.device
    rank: int
    world: int
    arch: torch.nn.Module  # possibly wrapped (DDP); ``plain`` shares its parameters, unwrapped
    plain: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedules: object
    n_images: int
    iters_per_epoch: int
    start: int
    amp: torch.dtype | None
    items: object = None
    main_iters: int = 0  # iterations before the high-resolution phase

    def highres(self, it: int) -> bool:
        """Whether iteration ``it`` belongs to the high-resolution phase."""
        return it >= self.main_iters

    def batch_size(self, it: int) -> int:
        hr = self.cfg.highres.batch_size_per_gpu or self.cfg.train.batch_size_per_gpu
        return hr if self.highres(it) else self.cfg.train.batch_size_per_gpu

    def batches(self, it: int):
        """The data stream of ``it``'s phase, positioned at iteration ``it`` (exact on resume)."""
        cfg, hr = self.cfg, self.highres(it)
        main_bs = cfg.train.batch_size_per_gpu
        position = main_bs * min(it, self.main_iters) + self.batch_size(it) * max(0, it - self.main_iters)
        return make_loader(self.items, build_augmentation(cfg, highres=hr), batch_size=self.batch_size(it),
                           grid=mask_grid(cfg, highres=hr), mask_probability=cfg.mask.probability,
                           mask_ratio=cfg.mask.ratio, seed=cfg.train.seed, start_sample=position,
                           num_workers=cfg.train.num_workers, rank=self.rank, world_size=self.world,
                           pin_memory=self.dev.type == "cuda")


def _setup(cfg: Config, data: str, device: str | None) -> tuple[_Run, object]:
    """Process group, model, optimizer, schedules, resume, data stream."""
    distributed = init_distributed()  # no-op without torchrun
    rank, world = get_rank(), get_world_size()
    run_dir = Path(cfg.train.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda and distributed else torch.device(
        device or ("cuda" if cuda else "cpu"))
    torch.manual_seed(cfg.train.seed)  # the same on every rank: DDP broadcasts the student, not the teacher
    items = training_items(data)
    ipe = iters_per_epoch(cfg, len(items), world)
    schedules = build_training_schedules(cfg, ipe, world_size=world)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision) if dev.type == "cuda" else None
    mode = ("fsdp" if cfg.train.parallel == "fsdp" else "ddp") if distributed else "none"
    arch = parallelize(build_arch(cfg, reduce=all_reduce_sum if distributed else None), device=dev, mode=mode,
                       compile=cfg.train.compile, activation_checkpointing=cfg.train.activation_checkpointing,
                       param_dtype=amp if mode == "fsdp" else None)
    optimizer = build_optimizer(cfg, unwrap(arch))  # after sharding: FSDP replaces the parameters
    start = _resume(run_dir, arch, optimizer, rank, world, cfg.train.seed)
    if distributed and start == 0:
        torch.manual_seed(cfg.train.seed + rank)  # different stochastic-depth draws per rank
    run = _Run(cfg, run_dir, dev, rank, world, arch, unwrap(arch), optimizer, schedules, len(items), ipe, start, amp,
               items=items, main_iters=cfg.train.epochs * ipe)
    return run, run.batches(start)


def _agree(flag: bool, dev: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dev)).item() > 0)


def _step(run: _Run, batch: dict, it: int) -> dict | None:
    """One optimisation step; None when the loss was non-finite on some rank (step skipped)."""
    v = run.schedules.at(it)
    apply_schedules(run.optimizer, v.lr, v.wd, v.last_layer_lr)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(run.dev.type, run.amp) if run.amp else nullcontext():
        loss, m = run.arch.forward_backward(batch, teacher_temp=v.teacher_temp)
    if _agree(not math.isfinite(loss.item()), run.dev):
        return None
    if run.cfg.optim.clip_grad:
        params = [p for p in run.arch.student.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.clip_grad)
        m["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor (FSDP)
    run.optimizer.step()
    run.arch.update_teacher(v.momentum)
    m.update(iteration=it + 1, lr=v.lr, wd=v.wd, momentum=v.momentum, teacher_temp=v.teacher_temp)
    return m


def train(cfg: Config, data: str, *, device: str | None = None, progress: bool = True,
          eval_train: str | None = None, eval_test: str | None = None) -> dict:
    """Pretrain on the images of ``data`` (folder, list file, or ``cifar10:train``); see module doc.

    Under ``torchrun`` each process trains on its share of every batch (DDP); rank 0 writes.
    With ``eval_train`` and ``eval_test`` (dataset specs, e.g. ``cifar10:train`` / ``cifar10:test``)
    the teacher is evaluated by kNN every ``train.eval_every`` iterations and at the end.
    """
    from tqdm.auto import tqdm

    run, batches = _setup(cfg, data, device)
    total, main_rank = run.schedules.total_iters, run.rank == 0
    if run.start >= total:
        log.info("run already finished (%d iterations)", total)
        return json.loads((run.run_dir / "results.json").read_text())
    monitor = CollapseMonitor(out_dim=cfg.head.out_dim)
    knn = KnnMonitor(eval_train, eval_test, cfg.crops.global_size, run.run_dir) if eval_train and eval_test else None
    if knn and is_sharded(run.arch):  # sharded extraction would need the same batch count on every rank
        log.warning("kNN monitoring is off under FSDP: evaluate teacher_backbone.pth with `dinolab eval knn`")
        knn = None
    nonfinite, skipped_images, images_seen, t0 = 0, 0, 0, time.perf_counter()
    log.info("training %d iterations (%d per epoch) on %d images, %s x %d", total - run.start,
             run.iters_per_epoch, run.n_images, run.dev, run.world)
    with GracefulExit() as stop, tqdm(total=total, initial=run.start, disable=not (progress and main_rank),
                                      unit="it") as bar:
        for it in range(run.start, total):
            if it == run.main_iters and it > run.start:
                log.info("high-resolution phase: %d iterations at %d px (local crops %d px)",
                         total - it, cfg.highres.global_size, cfg.highres.local_size)
                batches = run.batches(it)
            batch = _move(next(batches), run.dev)
            images_seen += run.batch_size(it) * run.world
            skipped_images += int(batch.pop("n_skipped"))
            m = _step(run, batch, it)
            if m is None:
                nonfinite += 1
                log.warning("non-finite loss at iteration %d (%d in a row): step skipped", it, nonfinite)
                if nonfinite >= MAX_NONFINITE:
                    raise DinolabError(f"{nonfinite} non-finite losses in a row at iteration {it}: lower "
                                       "optim.base_lr, raise optim.warmup_epochs, or use train.precision=fp32")
                continue
            nonfinite = 0
            monitor.update(it, m)
            m["images_per_s"] = images_seen / (time.perf_counter() - t0)
            if main_rank:
                _log(run, m, bar, last=it + 1 == total)
            bar.update()
            if knn and cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0 and it + 1 < total:
                knn(run.plain.teacher["backbone"], it + 1)
            stopping = _agree(stop.requested, run.dev)
            every = cfg.train.checkpoint_every
            if stopping or it + 1 == total or (every and (it + 1) % every == 0):
                model_state, optim_state = full_state(run.arch, run.optimizer)  # collective under FSDP
                if main_rank:
                    save_checkpoint(run.run_dir, it + 1, {"model": model_state, "optimizer": optim_state,
                                                          "config": config_to_dict(cfg)},
                                    keep_last=cfg.train.keep_last)
            if stopping:
                log.warning("stop requested: checkpoint saved at iteration %d; run the same command to resume", it + 1)
                return {"stopped_at": it + 1}
    train_seconds = time.perf_counter() - t0
    if knn:
        knn(run.plain.teacher["backbone"], total)
    teacher = run.plain.teacher["backbone"]
    if is_sharded(run.arch):  # gather the weights (a collective; rank 0 receives them) into a plain teacher
        model_state = full_state(run.arch)[0]
        teacher = _unsharded_teacher(cfg, model_state) if main_rank else None
    if not main_rank:
        return {"iterations": total}
    return _finish(run.run_dir, teacher, monitor, total, skipped_images, train_seconds, knn)


def _unsharded_teacher(cfg: Config, model_state: dict) -> torch.nn.Module:
    """A plain teacher backbone holding the weights of a full (gathered) model state dict."""
    from dinolab.config import backbone_kwargs
    from dinolab.models import DinoVisionTransformer

    prefix = "teacher.backbone."
    backbone = DinoVisionTransformer(**backbone_kwargs(cfg.model))
    backbone.load_state_dict({k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)})
    return backbone


def _log(run: _Run, m: dict, bar, *, last: bool) -> None:
    """Append the step's metrics to metrics.jsonl (every ``train.log_every``) and show them."""
    if m["iteration"] % max(run.cfg.train.log_every, 1) and not last:
        return
    with (run.run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(m) + "\n")
    bar.set_postfix(loss=f"{m['loss']:.3f}", dino=f"{m['dino']:.3f}", ibot=f"{m['ibot']:.3f}",
                    lr=f"{m['lr']:.1e}", img_s=f"{m['images_per_s']:.0f}")


def _finish(run_dir: Path, teacher: torch.nn.Module, monitor, total: int, skipped_images: int, seconds: float,
            knn: KnnMonitor | None) -> dict:
    """Export the teacher backbone, plot the losses, write results.json."""
    if total >= monitor.grace:  # the last window, whatever the check period
        monitor.check(total)
    export = save_official(teacher, run_dir / "teacher_backbone.pth")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    results = {"iterations": total, "teacher_backbone": str(export), "skipped_images": skipped_images,
               "train_wall_s_this_session": seconds, **monitor.summary()}
    if knn:
        results["knn"] = knn.history
    atomic_write_json(run_dir / "results.json", results)
    monitor.log_warnings()  # again at the end, where they are seen
    log.info("exported %s", export)
    return results
