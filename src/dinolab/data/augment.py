"""DINOv2 multi-crop augmentation: two global crops and ``n_local`` local crops per image.

Each view is a random resized crop (bicubic) plus a horizontal flip, then the BYOL colour recipe:
colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale with
p=0.2, Gaussian blur (kernel 9, sigma uniform in [0.1, 2.0]) and, on the second global crop only,
solarisation (threshold 128) with p=0.2. Then ToImage, float in [0, 1], mean/std normalisation.

The blur probability quirk
--------------------------
The official ``dinov2/data/augmentations.py`` (``DataAugmentationDINO.__init__``, commit 05c66df,
lines 82, 86 and 91) writes ``GaussianBlur(p=1.0)`` for the first global crop, ``GaussianBlur(p=0.1)``
for the second and ``GaussianBlur(p=0.5)`` for the local crops -- the BYOL recipe. But
``dinov2/data/transforms.py`` (class ``GaussianBlur``, lines 21-30) subclasses
``torchvision.transforms.RandomApply`` and passes ``p=1 - p`` to it, with a comment claiming that
torchvision applies ``1 - p``. ``RandomApply(p)`` *applies* its transforms with probability ``p``
(``if self.p < torch.rand(1): return img``), so as run the probabilities are inverted:

==============  =============================  ========================
view            ``blur="intended"`` (written)  ``blur="faithful"`` (run)
==============  =============================  ========================
global crop 1   1.0                            0.0 (never blurred)
global crop 2   0.1                            0.9
local crops     0.5                            0.5
==============  =============================  ========================

The released DINOv2 (and DINOv3, same code) models were trained with the "faithful" numbers, so
that is the default; "intended" gives the recipe as published. Reported upstream as
facebookresearch/dinov3 issue #286 (fix proposed in PR #342, which keeps the as-run numbers).

Randomness comes from torch's global generator (torchvision's convention), which ``DataLoader``
seeds differently in each worker; ``torch.manual_seed`` makes a single process reproducible.

Example::

    aug = MultiCropAugmentation()                       # ImageNet: 224 / 98, patch 14
    views = aug(pil_image)  # {"global": [2 x (3, 224, 224)], "local": [8 x (3, 98, 98)]}
    cifar = MultiCropAugmentation(global_size=32, local_size=16, patch_size=4)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

BlurMode = Literal["faithful", "intended"]

# Probability that the blur is applied to (global crop 1, global crop 2, each local crop).
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "faithful": (0.0, 0.9, 0.5),  # what the official code does when run
    "intended": (1.0, 0.1, 0.5),  # what it writes (BYOL, DINO paper)
}
SOLARIZE_PROBABILITY = 0.2  # second global crop only
SOLARIZE_THRESHOLD = 128  # on 8-bit values
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)


def blur_step(p: float) -> v2.RandomApply:
    """Gaussian blur (kernel 9, sigma in [0.1, 2.0]) applied with probability ``p`` (not ``1 - p``)."""
    return v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)], p=p)


def _check_size(name: str, size: int, patch_size: int) -> None:
    if size <= 0 or size % patch_size:
        below = max(patch_size, size // patch_size * patch_size)
        raise ValueError(
            f"{name}={size} is not a positive multiple of patch_size={patch_size}: the backbone would "
            f"drop the remainder. Use {name}={below} or {below + patch_size} (or change patch_size)."
        )


def _check_scale(name: str, scale: Sequence[float]) -> None:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")


def _view_pipeline(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """One view: geometry, colour, blur (+ solarise), then a normalised (3, size, size) float tensor."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        blur_step(blur_p),
    ]
    if solarize:
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_PROBABILITY))
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


class MultiCropAugmentation:
    """Turn one image into ``{"global": [2 x (3, G, G)], "local": [n_local x (3, L, L)]}``.

    Args:
        global_size: side G of the two global crops (a multiple of ``patch_size``).
        local_size: side L of the local crops (a multiple of ``patch_size``).
        global_scale: area fraction range of the global random resized crops.
        local_scale: area fraction range of the local random resized crops.
        n_local: number of local crops (0 disables them).
        blur: "faithful" (0.0 / 0.9 / 0.5, as the official code runs) or "intended"
            (1.0 / 0.1 / 0.5, as written); see the module docstring.
        patch_size: backbone patch size, only used to validate the crop sizes.
        mean, std: normalisation (ImageNet by default).

    Input: an RGB ``PIL.Image`` (other modes are converted) or a uint8 (3, H, W) tensor.
    The per-view pipelines are public (``global_transforms``, ``local_transform``) for inspection.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        n_local: int = 8,
        blur: BlurMode = "faithful",
        patch_size: int = 14,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        _check_size("global_size", global_size, patch_size)
        _check_size("local_size", local_size, patch_size)
        _check_scale("global_scale", global_scale)
        _check_scale("local_scale", local_scale)
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        if blur not in BLUR_PROBABILITIES:
            raise ValueError(f"blur must be one of {sorted(BLUR_PROBABILITIES)}, got {blur!r}")
        self.global_size, self.local_size, self.n_local, self.blur = global_size, local_size, n_local, blur
        p1, p2, p_local = BLUR_PROBABILITIES[blur]
        gscale, lscale = tuple(global_scale), tuple(local_scale)
        self.global_transforms: tuple[v2.Compose, v2.Compose] = (
            _view_pipeline(global_size, gscale, p1, False, mean, std),
            _view_pipeline(global_size, gscale, p2, True, mean, std),
        )
        self.local_transform: v2.Compose = _view_pipeline(local_size, lscale, p_local, False, mean, std)
        logger.info(
            "multi-crop: 2 x %d px (scale %s) + %d x %d px (scale %s), blur=%s (p=%s)",
            global_size, gscale, n_local, local_size, lscale, blur, BLUR_PROBABILITIES[blur],
        )

    @property
    def blur_probabilities(self) -> tuple[float, float, float]:
        """Probability of blurring (global crop 1, global crop 2, each local crop)."""
        return BLUR_PROBABILITIES[self.blur]

    def __call__(self, image: Image.Image | Tensor) -> dict[str, list[Tensor]]:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        global_crops = [t(image) for t in self.global_transforms]  # 2 x (3, G, G)
        local_crops = [self.local_transform(image) for _ in range(self.n_local)]  # n_local x (3, L, L)
        return {"global": global_crops, "local": local_crops}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
            f"n_local={self.n_local}, blur={self.blur!r})"
        )
