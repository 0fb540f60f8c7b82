"""iBOT masked-patch loss: the student predicts the teacher's distribution for patches it did not see.

Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", as used in DINOv2
(Oquab et al. 2023). Follows facebookresearch/dinov2 ``dinov2/loss/ibot_patch_loss.py``
(``iBOTPatchLoss.forward_masked``) and the weighting in ``dinov2/train/ssl_meta_arch.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class iBOTPatchLoss(nn.Module):
    """Weighted cross-entropy over the M masked patches of a batch of images.

    Inputs, for the masked patches only (gathered from the student's global crops, where they
    were replaced by the mask token, and from the teacher, which saw them)::

        student_logits  (M, K)  student head outputs
        teacher_probs   (M, K)  teacher targets (SoftmaxCentering / SinkhornKnopp), same patch order
        weights         (M,)    1 / (number of masked patches in the patch's image): ``patch_weights``
        n_images        int     images the masks were drawn for, masked or not (2 * B for DINOv2)

    ::

        loss = -1/n_images * sum_m weights[m] * sum_k teacher_probs[m, k]
                                               * log_softmax(student_logits[m] / student_temp)[k]

    i.e. each image's mean cross-entropy over its masked patches, averaged over all images, with
    unmasked images contributing 0. Official weighting: ``ibot_loss = ibot_loss_weight * loss``
    (``forward_masked * 2 * (1 / 2)`` in ``ssl_meta_arch.py``; its logged value is ``loss / 2``).
    Per process: ``n_images`` and the weights are local; no communication here.

    The student log-softmax is computed in float32; gradients flow into ``student_logits`` only.

    Args:
        student_temp: temperature of the student softmax (official: 0.1).

    Example:
        >>> masks = torch.rand(4, 16) < 0.3                    # (n_images, patches per image)
        >>> w = patch_weights(masks)                            # (M,), M = masks.sum()
        >>> s, t = torch.randn(len(w), 32), torch.softmax(torch.randn(len(w), 32), -1)
        >>> iBOTPatchLoss()(s, t, w, n_images=masks.shape[0])
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, weights: Tensor, n_images: int) -> Tensor:
        """Scalar weighted masked-patch cross-entropy; see the class docstring."""
        if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"expected student logits and teacher probs of the same shape (M, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        if weights.shape != student_logits.shape[:1]:
            raise ValueError(f"weights must be (M,) = ({student_logits.shape[0]},), got {tuple(weights.shape)}")
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (M, K)
        ce = -(teacher_probs.detach().float() * log_p).sum(dim=-1)  # (M,)
        return (ce * weights.float()).sum() / n_images


def patch_weights(masks: Tensor) -> Tensor:
    """Per-masked-patch weights ``(M,)`` from boolean masks ``(n_images, n_patches)``.

    Each masked patch gets ``1 / (masked patches in its image)``, listed in ``masks[masks]`` order
    (row-major: image by image), the order in which masked tokens are gathered.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor (n_images, n_patches), got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=1, keepdim=True).clamp(min=1).float()  # (n_images, 1)
    return per_image.expand_as(masks)[masks]
