"""The DINOv2 student/teacher pair and one training step, as labelled steps (dinov3 style).

``forward_backward(batch, teacher_temp=...)``:
  1. teacher targets: teacher backbone on the global crops -> DINO head on CLS -> centred targets;
     iBOT head on the teacher's patch tokens at the masked positions -> centred targets;
  2. student outputs: student backbone on the masked global crops and on the local crops -> heads;
  3. losses: DINO (local and global view pairs, official weighting), iBOT (masked patches),
     KoLeo (student CLS of each global view);
  4. backward.
Centering is an object chosen at construction (softmax centring or Sinkhorn-Knopp), not a switch.
Nothing here knows about distribution: DDP/FSDP wrap ``student`` from outside, and the centering
objects carry the all-reduce they need.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.losses import DINOLoss, KoLeoLoss, TeacherCentering, dino_loss_term_count, iBOTPatchLoss
from dinolab.models.layers import DropPath
from dinolab.train.ema import ema_update_module_


@dataclass(frozen=True)
class LossWeights:
    """Official defaults: DINO 1.0, iBOT 1.0, KoLeo 0.1."""

    dino: float = 1.0
    ibot: float = 1.0
    koleo: float = 0.1


class SSLMetaArch(nn.Module):
    """Student (backbone + DINO head + iBOT head) and its EMA teacher.

    Args:
        backbone: a ``DinoVisionTransformer`` (the student; the teacher is a deep copy).
        dino_head, ibot_head: projection heads; pass the same module twice to share them.
        dino_centering, ibot_centering: teacher-target centering objects (``dinolab.losses``).
        weights: loss weights. student_temp: student softmax temperature (0.1).
        packed_crops: run the student's global and local crops in one packed backbone pass
            (``forward_features_list``) instead of two; same result up to float rounding.
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module, *,
                 dino_centering: TeacherCentering, ibot_centering: TeacherCentering,
                 weights: LossWeights = LossWeights(), student_temp: float = 0.1,
                 packed_crops: bool = False) -> None:
        super().__init__()
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": dino_head})
        self.shared_heads = ibot_head is dino_head
        if not self.shared_heads:
            self.student["ibot_head"] = ibot_head
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        for m in self.teacher.modules():  # the teacher has no stochastic depth (official: rate 0)
            if isinstance(m, DropPath):
                m.p = 0.0
        self.dino_centering, self.ibot_centering = dino_centering, ibot_centering
        self.weights = weights
        self.packed_crops = packed_crops
        self.dino_loss, self.ibot_loss = DINOLoss(student_temp), iBOTPatchLoss(student_temp)
        self.koleo_loss = KoLeoLoss()

    def _ibot_head(self, part: nn.ModuleDict) -> nn.Module:
        return part["dino_head"] if self.shared_heads else part["ibot_head"]

    @torch.no_grad()
    def teacher_targets(self, *, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float
                        ) -> tuple[Tensor, Tensor]:
        """DINO targets (2, B, K) view-major and iBOT targets (M, K) for the masked patches."""
        out = self.teacher["backbone"](global_crops)  # cls (2B, D), patches (2B, N, D)
        dino_logits = self.teacher["dino_head"](out.cls_token)  # (2B, K)
        patches = out.patch_tokens.flatten(0, 1)[mask_indices]  # (M, D)
        ibot_logits = self._ibot_head(self.teacher)(patches)  # (M, K)
        dino = self.dino_centering.targets(dino_logits, teacher_temp)
        ibot = self.ibot_centering.targets(ibot_logits, teacher_temp)
        self.dino_centering.update(dino_logits)
        self.ibot_centering.update(ibot_logits)
        return dino.unflatten(0, (2, -1)), ibot

    def student_outputs(self, *, global_crops: Tensor, local_crops: Tensor, masks: Tensor,
                        mask_indices: Tensor) -> dict[str, Tensor]:
        """Student logits: global (2, B, K), local (L, B, K), masked patches (M, K); CLS (2B, D)."""
        backbone, has_local = self.student["backbone"], local_crops.numel() > 0
        if self.packed_crops and has_local:
            g, loc = backbone([global_crops, local_crops], masks=[masks, None])
        else:
            g = backbone(global_crops, masks=masks)
            loc = backbone(local_crops) if has_local else None
        out = {"global": self.student["dino_head"](g.cls_token).unflatten(0, (2, -1)), "cls": g.cls_token}
        out["ibot"] = self._ibot_head(self.student)(g.patch_tokens.flatten(0, 1)[mask_indices])
        if loc is not None:  # local CLS (L*B, D)
            out["local"] = self.student["dino_head"](loc.cls_token).unflatten(0, (-1, out["global"].shape[1]))
        return out

    def losses(self, s: dict[str, Tensor], dino_t: Tensor, ibot_t: Tensor, *, masks_weight: Tensor
               ) -> tuple[Tensor, dict[str, float]]:
        """Weighted total loss and its components (the official weighting, see ``DINOLoss``)."""
        n_local = s["local"].shape[0] if "local" in s else 0
        dino = self.dino_loss(s["global"], dino_t, skip_same_view=True)
        if n_local:
            dino = dino + self.dino_loss(s["local"], dino_t, skip_same_view=False)
        dino = dino / dino_loss_term_count(2, n_local)
        ibot = self.ibot_loss(s["ibot"], ibot_t, masks_weight, n_images=s["cls"].shape[0])
        views = s["cls"].chunk(2)  # KoLeo needs two images (a batch may keep one after skipping bad ones)
        koleo = sum(self.koleo_loss(c) for c in views) if len(views[0]) >= 2 else s["cls"].new_zeros(())
        w = self.weights
        total = w.dino * dino + w.ibot * ibot + w.koleo * koleo
        return total, {"loss": total.item(), "dino": dino.item(), "ibot": ibot.item(), "koleo": koleo.item()}

    def forward_backward(self, batch: dict[str, Tensor], *, teacher_temp: float) -> tuple[Tensor, dict[str, float]]:
        """One step's forward and backward on a ``collate_multicrop`` batch; returns (loss, metrics)."""
        g, idx = batch["global_crops"], batch["mask_indices"]
        dino_t, ibot_t = self.teacher_targets(global_crops=g, mask_indices=idx, teacher_temp=teacher_temp)
        s = self.student_outputs(global_crops=g, local_crops=batch["local_crops"], masks=batch["masks"],
                                 mask_indices=idx)
        loss, metrics = self.losses(s, dino_t, ibot_t, masks_weight=batch["masks_weight"])
        loss.backward()
        metrics.update(collapse_metrics(dino_t, s["cls"].detach()))
        return loss.detach(), metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student."""
        ema_update_module_(self.teacher, self.student, momentum)


@torch.no_grad()
def collapse_metrics(dino_targets: Tensor, student_cls: Tensor) -> dict[str, float]:
    """Signals of collapse, cheap enough for every step.

    - ``target_entropy``: mean entropy of the teacher's DINO targets (0 = one-hot, log K = uniform);
    - ``prototypes_in_use``: exp(entropy of the batch-mean target), the effective number of
      prototypes the batch spreads over (collapse: it falls towards 1);
    - ``cls_std_x_sqrt_d``: mean per-dimension std of the L2-normalised student CLS tokens times
      sqrt(D) (collapse to one point: it falls towards 0; well-spread features give about 1).
    - ``log_k``: log of the number of prototypes, the DINO loss of uniform targets.
    """
    p = dino_targets.flatten(0, 1).float()  # (2B, K)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean_p = p.mean(0)
    in_use = torch.exp(-(mean_p * mean_p.clamp_min(1e-12).log()).sum())
    std = F.normalize(student_cls.float(), dim=-1).std(0).mean() * math.sqrt(student_cls.shape[-1])
    return {"target_entropy": ent.item(), "prototypes_in_use": in_use.item(), "cls_std_x_sqrt_d": std.item(),
            "log_k": math.log(p.shape[-1])}
