"""DINOv2 training losses and teacher-target rules; plain tensors in, scalars out.

Distribution enters only through an injected ``reduce`` (all-reduce SUM) in the target rules.
"""

from dinolab.losses.centering import (
    Reduce,
    SinkhornKnopp,
    SoftmaxCentering,
    TeacherCentering,
    identity_reduce,
)
from dinolab.losses.dino import DINOLoss, dino_loss_term_count
from dinolab.losses.ibot import iBOTPatchLoss, patch_weights
from dinolab.losses.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "Reduce",
    "SinkhornKnopp",
    "SoftmaxCentering",
    "TeacherCentering",
    "dino_loss_term_count",
    "iBOTPatchLoss",
    "identity_reduce",
    "patch_weights",
]
