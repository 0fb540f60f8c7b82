"""``dinolab train``: the pretraining loop — schedules, step, EMA, logging, checkpoints, export.

The run folder (``train.output_dir``) holds ``config.yaml`` (resolved, as the run started),
``metrics.jsonl`` (one line per logged step), ``checkpoints/`` (atomic, keep-last-k; a killed or
SIGTERM'd run resumes from the newest), ``resumes.jsonl`` (one line per resume),
``teacher_backbone.pth`` (official layout, loadable with ``dinolab.load_model``), ``loss.png`` and
``results.json``. A resume is refused when the config or the data differ from the checkpoint's unless
forced (``dinolab.train.rundir``); it cuts the logs back to the checkpoint's iteration and removes
stale checkpoint temp files. Weights that stop being finite are never checkpointed or exported.
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
from dinolab.train.checkpointing import (
    GracefulExit,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    set_rng_state,
)
from dinolab.train.data import make_loader, training_items
from dinolab.train.monitor import CollapseMonitor, KnnMonitor, plot_losses
from dinolab.train.optim import apply_schedules
from dinolab.train.parallelize import full_state, is_sharded, load_full_state, parallelize, unwrap
from dinolab.train.rundir import check_resume, data_record, nonfinite_tensors, truncate_logs

log = logging.getLogger(__name__)
MAX_NONFINITE = 10  # consecutive non-finite losses before the run stops
MAX_EMPTY = 10  # consecutive batches without a decodable image before the run stops


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _previous_run(run_dir: Path, cfg: Config, data: dict, *, force: bool) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` and its contents (RNG not restored yet), after checking
    that it was trained with this config and data (``force``: accept and record the changes)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    state = load_checkpoint(path, restore_rng=False)
    check_resume(run_dir, path, state, config_to_dict(cfg), data, force=force, write=get_rank() == 0)
    return path, state


def _resume(previous: tuple[Path, dict] | None, arch, optimizer, rank: int, world: int, seed: int) -> int:
    """Load the checkpoint found by ``_previous_run`` (models, optimizer, centering, RNG); its iteration.

    One process restores the saved RNG exactly; with several, each rank re-seeds from
    (seed, rank, iteration) instead (the checkpoint holds rank 0's RNG only)."""
    if previous is None:
        return 0
    path, state = previous
    try:
        load_full_state(arch, state["model"], optimizer, state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # another architecture: shapes or names differ
        detail = " ".join(str(e).split())
        raise DinolabError(f"checkpoint {path} does not fit the model this config builds ({detail[:300]}); "
                           "resume with the run's own config or use another train.output_dir") from None
    if world > 1:
        torch.manual_seed(seed + 1000 * int(state["iteration"]) + rank)
    elif "rng" in state:
        set_rng_state(state["rng"])
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
    data: dict | None = None  # ``data_record`` of the training data, saved in every checkpoint
    t0: float = 0.0  # when this session's training started (perf_counter)

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


def _setup(cfg: Config, data: str, device: str | None, force: bool = False) -> _Run:
    """Process group, model, optimizer, schedules, resume (checked against the checkpoint)."""
    distributed = init_distributed()  # no-op without torchrun
    rank, world = get_rank(), get_world_size()
    run_dir = Path(cfg.train.output_dir)
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda and distributed else torch.device(
        device or ("cuda" if cuda else "cpu"))
    items = training_items(data)
    record = data_record(data, len(items))
    previous = _previous_run(run_dir, cfg, record, force=force)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)
        truncate_logs(run_dir, int(previous[1]["iteration"]) if previous else 0)
        if previous is None:  # a resume keeps the config the run started with
            save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # the same on every rank: DDP broadcasts the student, not the teacher
    ipe = iters_per_epoch(cfg, len(items), world)
    schedules = build_training_schedules(cfg, ipe, world_size=world)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision) if dev.type == "cuda" else None
    mode = ("fsdp" if cfg.train.parallel == "fsdp" else "ddp") if distributed else "none"
    arch = parallelize(build_arch(cfg, reduce=all_reduce_sum if distributed else None), device=dev, mode=mode,
                       compile=cfg.train.compile, activation_checkpointing=cfg.train.activation_checkpointing,
                       param_dtype=amp if mode == "fsdp" else None)
    optimizer = build_optimizer(cfg, unwrap(arch))  # after sharding: FSDP replaces the parameters
    start = _resume(previous, arch, optimizer, rank, world, cfg.train.seed)
    del previous  # the checkpoint's tensors are in the model now
    if distributed and start == 0:
        torch.manual_seed(cfg.train.seed + rank)  # different stochastic-depth draws per rank
    return _Run(cfg, run_dir, dev, rank, world, arch, unwrap(arch), optimizer, schedules, len(items), ipe, start,
                amp, items=items, main_iters=cfg.train.epochs * ipe, data=record)


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


@dataclass
class _Counts:
    """What the loop counts: images drawn and skipped, skipped steps, and the current runs of skips."""

    images_seen: int = 0
    steps: int = 0  # optimisation steps taken in this session
    skipped_images: int = 0
    skipped_batches: int = 0  # batches without one decodable image: no step
    nonfinite: int = 0  # non-finite losses in a row
    empty: int = 0  # batches without a decodable image in a row


def _iteration(run: _Run, batch: dict, it: int, c: _Counts) -> dict | None:
    """Iteration ``it`` on ``batch``: its metrics, or None when the step was skipped (no decodable image
    in the batch on some rank, or a non-finite loss); too many skips in a row stop the run."""
    c.images_seen += run.batch_size(it) * run.world
    c.skipped_images += int(batch.pop("n_skipped"))
    if _agree("global_crops" not in batch, run.dev):
        c.empty, c.skipped_batches = c.empty + 1, c.skipped_batches + 1
        log.warning("iteration %d: no image of the batch could be decoded (%d in a row): step skipped", it, c.empty)
        if c.empty >= MAX_EMPTY:
            raise DinolabError(f"{c.empty} batches in a row held no decodable image ({c.skipped_images} images "
                               f"skipped so far): check the training data {run.data['source']}")
        return None
    c.empty = 0
    m = _step(run, _move(batch, run.dev), it)
    if m is None:
        c.nonfinite += 1
        log.warning("non-finite loss at iteration %d (%d in a row): step skipped", it, c.nonfinite)
        if c.nonfinite >= MAX_NONFINITE:
            raise DinolabError(f"{c.nonfinite} non-finite losses in a row at iteration {it}: lower "
                               "optim.base_lr, raise optim.warmup_epochs, or use train.precision=fp32")
        return None
    c.nonfinite, c.steps = 0, c.steps + 1
    m["images_per_s"] = c.images_seen / max(time.perf_counter() - run.t0, 1e-9)
    return m


def _checkpoint(run: _Run, iteration: int) -> None:
    """Save the full state at ``iteration`` (rank 0), unless the weights are no longer finite: then stop
    with an error and leave the last good checkpoint as the latest."""
    model_state, optim_state = full_state(run.arch, run.optimizer)  # collective under FSDP
    bad = nonfinite_tensors(model_state) if run.rank == 0 else []
    if _agree(bool(bad), run.dev):
        last = latest_checkpoint(run.run_dir)
        raise DinolabError(f"the weights are no longer finite at iteration {iteration} ({len(bad)} tensors, e.g. "
                           f"{bad[:1]}): nothing saved or exported; last good checkpoint: {last}. Lower "
                           "optim.base_lr, raise optim.warmup_epochs or use train.precision=fp32")
    if run.rank == 0:
        save_checkpoint(run.run_dir, iteration, {"model": model_state, "optimizer": optim_state,
                                                 "config": config_to_dict(run.cfg), "data": run.data},
                        keep_last=run.cfg.train.keep_last)


def train(cfg: Config, data: str, *, device: str | None = None, progress: bool = True,
          eval_train: str | None = None, eval_test: str | None = None, force: bool = False) -> dict:
    """Pretrain on the images of ``data`` (folder, list file, or ``cifar10:train``); see module doc.

    Under ``torchrun`` each process trains on its share of every batch (DDP); rank 0 writes.
    With ``eval_train`` and ``eval_test`` (dataset specs, e.g. ``cifar10:train`` / ``cifar10:test``)
    the teacher is evaluated by kNN every ``train.eval_every`` iterations and at the end. Resuming
    with another config or data raises ``DinolabError`` listing the changes, unless ``force``.
    A finished run only exports what is missing (``teacher_backbone.pth``, ``results.json``).
    """
    from tqdm.auto import tqdm

    run = _setup(cfg, data, device, force=force)
    total, main_rank = run.schedules.total_iters, run.rank == 0
    if run.start >= total:
        return _already_finished(run, total)
    monitor = CollapseMonitor(out_dim=cfg.head.out_dim)
    knn = KnnMonitor(eval_train, eval_test, cfg.crops.global_size, run.run_dir) if eval_train and eval_test else None
    if knn and is_sharded(run.arch):  # sharded extraction would need the same batch count on every rank
        log.warning("kNN monitoring is off under FSDP: evaluate teacher_backbone.pth with `dinolab eval knn`")
        knn = None
    counts, run.t0 = _Counts(), time.perf_counter()
    log.info("training %d iterations (%d per epoch) on %d images, %s x %d", total - run.start,
             run.iters_per_epoch, run.n_images, run.dev, run.world)
    batches = run.batches(run.start)
    with GracefulExit() as stop, tqdm(total=total, initial=run.start, disable=not (progress and main_rank),
                                      unit="it") as bar:
        for it in range(run.start, total):
            if it == run.main_iters and it > run.start:
                log.info("high-resolution phase: %d iterations at %d px (local crops %d px)",
                         total - it, cfg.highres.global_size, cfg.highres.local_size)
                batches = run.batches(it)
            m = _iteration(run, next(batches), it, counts)
            if m is not None:
                monitor.update(it, m)
                if main_rank:
                    _log(run, m, bar, last=it + 1 == total)
            bar.update()
            if knn and cfg.train.eval_every and (it + 1) % cfg.train.eval_every == 0 and it + 1 < total:
                knn(run.plain.teacher["backbone"], it + 1)
            stopping = _agree(stop.requested, run.dev)
            every = cfg.train.checkpoint_every
            due = stopping or it + 1 == total or (every and (it + 1) % every == 0)
            if due and (counts.steps or run.start):  # nothing learnt yet (every batch skipped): no checkpoint
                _checkpoint(run, it + 1)
            if stopping:
                log.warning("stop requested: checkpoint saved at iteration %d; run the same command to resume", it + 1)
                return {"stopped_at": it + 1}
    train_seconds = time.perf_counter() - run.t0
    if run.start == 0 and counts.steps == 0:
        raise DinolabError(f"no training step ran ({counts.skipped_batches} of {total} batches held no decodable "
                           f"image, the others gave non-finite losses): nothing exported; check the data {data}")
    if knn:
        knn(run.plain.teacher["backbone"], total)
    teacher = _gathered_teacher(run)
    if not main_rank:
        return {"iterations": total}
    return _finish(run.run_dir, teacher, monitor, total, counts, train_seconds, knn)


def _gathered_teacher(run: _Run) -> torch.nn.Module | None:
    """The teacher backbone; under FSDP gathered (a collective) into a plain one on rank 0 (None elsewhere)."""
    if not is_sharded(run.arch):
        return run.plain.teacher["backbone"]
    model_state = full_state(run.arch)[0]
    return _unsharded_teacher(run.cfg, model_state) if run.rank == 0 else None


def _already_finished(run: _Run, total: int) -> dict:
    """A re-run of a finished run: its results, after exporting them if the run stopped before that."""
    done = all((run.run_dir / name).is_file() for name in ("teacher_backbone.pth", "results.json"))
    if done and run.rank == 0:
        log.info("%s already finished (%d iterations): nothing to do; use another train.output_dir to train "
                 "again", run.run_dir, total)
        return {**json.loads((run.run_dir / "results.json").read_text()), "already_finished": True}
    if not done:
        log.info("%s finished its %d iterations but stopped before the export: exporting now", run.run_dir, total)
    teacher = None if done else _gathered_teacher(run)  # a collective under FSDP
    if run.rank != 0:
        return {"iterations": total, "already_finished": True}
    res = _finish(run.run_dir, teacher, CollapseMonitor(out_dim=run.cfg.head.out_dim), total, _Counts(), 0.0, None)
    return {**res, "already_finished": True}


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


def _finish(run_dir: Path, teacher: torch.nn.Module, monitor, total: int, counts: _Counts, seconds: float,
            knn: KnnMonitor | None) -> dict:
    """Export the teacher backbone (refused when its weights are not finite), plot the losses, write
    results.json."""
    if total >= monitor.grace:  # the last window, whatever the check period
        monitor.check(total)
    bad = nonfinite_tensors(teacher.state_dict())
    if bad:
        raise DinolabError(f"the teacher's weights are not finite ({len(bad)} tensors, e.g. {bad[0]}): not "
                           f"exporting {run_dir / 'teacher_backbone.pth'}; lower optim.base_lr and train again")
    export = save_official(teacher, run_dir / "teacher_backbone.pth")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    results = {"iterations": total, "teacher_backbone": str(export), "skipped_images": counts.skipped_images,
               "skipped_batches": counts.skipped_batches, "train_wall_s_this_session": seconds, **monitor.summary()}
    if knn:
        results["knn"] = knn.history
    atomic_write_json(run_dir / "results.json", results)
    monitor.log_warnings()  # again at the end, where they are seen
    log.info("exported %s", export)
    return results
