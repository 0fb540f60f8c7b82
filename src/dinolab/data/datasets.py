"""Labelled image datasets for evaluation: ImageFolder folders or tars, list files, CIFAR-10."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class LabeledImages:
    """Images with integer labels.

    Attributes:
        items: image paths, or one uint8 array (N, H, W, 3) of decoded images (see ``decoded``).
        labels: (N,) int64 class indices into ``classes``.
        classes: class names, index = label.
        ids: one id per image (relative path), used in outputs.
    """

    items: Sequence[str | os.PathLike] | np.ndarray
    labels: np.ndarray
    classes: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledImages:
        """The images at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        items = self.items[idx] if isinstance(self.items, np.ndarray) else [self.items[i] for i in idx]
        return LabeledImages(items, self.labels[idx], self.classes, [self.ids[i] for i in idx])
