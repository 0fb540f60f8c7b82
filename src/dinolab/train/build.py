"""Build the training parts from a ``Config`` — the one place where the config is read."""

from __future__ import annotations

import torch

from dinolab.config import Config, backbone_kwargs, ibot_head_dims, patch_size, scaled_lr
from dinolab.data.augment import MultiCropAugmentation
from dinolab.losses import SinkhornKnopp, SoftmaxCentering, TeacherCentering
from dinolab.losses.centering import Reduce
from dinolab.models import DinoVisionTransformer
from dinolab.models.heads import DINOHead
from dinolab.train.meta_arch import LossWeights, SSLMetaArch
from dinolab.train.optim import make_adamw, param_groups
from dinolab.train.schedules import Schedules, build_schedules


def build_centering(cfg: Config, out_dim: int, reduce: Reduce | None) -> TeacherCentering:
    if cfg.loss.centering == "sinkhorn_knopp":
        return SinkhornKnopp(cfg.loss.sinkhorn_iters, reduce=reduce)
    return SoftmaxCentering(out_dim, cfg.loss.center_momentum, reduce=reduce)


def build_arch(cfg: Config, reduce: Reduce | None = None) -> SSLMetaArch:
    """Student backbone + heads + EMA teacher, with the configured centering."""
    backbone = DinoVisionTransformer(**backbone_kwargs(cfg.model))
    h = cfg.head
    dino_head = DINOHead(backbone.embed_dim, h.out_dim, hidden_dim=h.hidden_dim,
                         bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers)
    ibot_dims = ibot_head_dims(h)
    ibot_head = DINOHead(backbone.embed_dim, **ibot_dims) if h.separate_ibot_head else dino_head
    weights = LossWeights(cfg.loss.dino_weight, cfg.loss.ibot_weight, cfg.loss.koleo_weight)
    return SSLMetaArch(backbone, dino_head, ibot_head, weights=weights, student_temp=cfg.loss.student_temp,
                       packed_crops=cfg.train.packed_crops,
                       dino_centering=build_centering(cfg, h.out_dim, reduce),
                       ibot_centering=build_centering(cfg, ibot_dims["out_dim"], reduce))


def build_augmentation(cfg: Config, *, highres: bool = False) -> MultiCropAugmentation:
    """The multi-crop augmentation of the main phase, or (``highres``) of the high-resolution phase,
    which changes only the crop sizes."""
    c = cfg.crops
    g, loc = (cfg.highres.global_size, cfg.highres.local_size) if highres else (c.global_size, c.local_size)
    return MultiCropAugmentation(global_size=g, local_size=loc, global_scale=c.global_scale,
                                 local_scale=c.local_scale, n_local=c.n_local, blur=c.blur,
                                 patch_size=patch_size(cfg.model))


def build_optimizer(cfg: Config, arch: SSLMetaArch) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups; call it after ``parallelize`` (parameters on their
    device, FSDP shards in place). On CUDA with plain (unsharded) parameters it uses PyTorch's fused
    AdamW kernel, one kernel for the whole update; elsewhere PyTorch's default implementation."""
    o = cfg.optim
    groups = param_groups(arch.student, lr_decay_rate=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult)
    return make_adamw(groups, betas=tuple(o.betas), fused=True if use_fused_adamw(arch.student.parameters()) else None)


def use_fused_adamw(params) -> bool:
    """True when every trainable parameter is a plain CUDA tensor (FSDP's DTensor shards keep the default)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no shards either
        DTensor = ()  # isinstance(x, ()) is always False

    params = [p for p in params if p.requires_grad]
    return bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)


def build_training_schedules(cfg: Config, iters_per_epoch: int, world_size: int = 1) -> Schedules:
    """The official schedules over the whole run: ``train.epochs`` epochs, then the
    ``highres.iterations`` of the high-resolution phase, which continue the same curves (the
    paper's "short period at the end of pretraining", not a restart)."""
    o, lo = cfg.optim, cfg.loss
    return build_schedules(
        total_iters=cfg.train.epochs * iters_per_epoch + cfg.highres.iterations, iters_per_epoch=iters_per_epoch,
        base_lr=scaled_lr(cfg, world_size), min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, wd=o.weight_decay,
        wd_end=o.weight_decay_end, momentum=o.momentum_teacher, momentum_end=o.final_momentum_teacher,
        teacher_temp=lo.teacher_temp, warmup_teacher_temp=lo.warmup_teacher_temp,
        warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs)


def mask_grid(cfg: Config, *, highres: bool = False) -> tuple[int, int]:
    """Patch grid (h, w) of the global crops, where the iBOT masks live."""
    n = (cfg.highres.global_size if highres else cfg.crops.global_size) // patch_size(cfg.model)
    return (n, n)
