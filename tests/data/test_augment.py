"""Multi-crop augmentation: shapes, the official recipe's parameters, and the blur-probability quirk.

Probabilities are measured by running each pipeline's own ``RandomApply`` step many times with the
blur (or solarisation) swapped for a counter, so no image is blurred thousands of times.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinolab.data.augment import BLUR_PROBABILITIES, MultiCropAugmentation, blur_step

pytestmark = pytest.mark.usefixtures("one_thread")


DRAWS = 4000
TOLERANCE = 0.03  # > 4 standard deviations of a rate measured over 4000 draws (sd <= 0.0079)


def _image(h: int, w: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _steps(pipeline: v2.Compose, kind: type) -> list:
    """Steps of ``kind``, looking inside RandomApply wrappers (which are returned whole)."""
    found = []
    for step in pipeline.transforms:
        inner = step.transforms if isinstance(step, v2.RandomApply) else [step]
        if any(isinstance(t, kind) for t in inner):
            found.append(step)
    return found


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x


def _applied_rate(step: v2.Transform) -> float:
    """How often ``step`` applies its transform: a copy of it with the transform swapped for a counter."""
    step = copy.deepcopy(step)
    counter = _Counter()
    if isinstance(step, v2.RandomApply):
        step.transforms = [counter]
    else:  # RandomSolarize and similar: count calls of the per-sample transform
        step.transform = lambda inpt, params: counter(inpt)
    x = torch.zeros(1, 1, 1, dtype=torch.uint8)
    for _ in range(DRAWS):
        step(x)
    return counter.calls / DRAWS


def _pipelines(aug: MultiCropAugmentation) -> list[v2.Compose]:
    return [*aug.global_transforms, aug.local_transform]


# ------------------------------------------------------------------------------------- shapes


def test_imagenet_shapes_and_counts():
    torch.manual_seed(0)
    out = MultiCropAugmentation()(_image(256, 320))
    assert set(out) == {"global", "local"}
    assert [tuple(t.shape) for t in out["global"]] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in out["local"]] == [(3, 98, 98)] * 8
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in out["global"] + out["local"])


def test_cifar_sizes_and_non_rgb_input():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=32, local_size=16, patch_size=4, n_local=6)
    out = aug(_image(32, 32, mode="L"))
    assert [tuple(t.shape) for t in out["global"]] == [(3, 32, 32)] * 2
    assert [tuple(t.shape) for t in out["local"]] == [(3, 16, 16)] * 6
    assert MultiCropAugmentation(global_size=32, local_size=16, patch_size=4, n_local=0)(
        _image(32, 32))["local"] == []


def test_uint8_tensor_input():
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=32, local_size=16, patch_size=4, n_local=2)
    out = aug(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert tuple(out["global"][1].shape) == (3, 32, 32)


def test_same_torch_seed_same_views():
    aug = MultiCropAugmentation(global_size=32, local_size=16, patch_size=4, n_local=2)
    img = _image(48, 48)
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]))


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"global_size": 225}, "global_size=224 or 238"),
    ({"local_size": 96}, "local_size=84 or 98"),
    ({"global_size": 30, "local_size": 16, "patch_size": 4}, "global_size=28 or 32"),
])
def test_sizes_must_be_patch_multiples(kwargs, fix):
    with pytest.raises(ValueError, match="multiple of patch_size") as err:
        MultiCropAugmentation(**kwargs)
    assert fix in str(err.value)


@pytest.mark.parametrize("kwargs", [
    {"blur": "paper"}, {"global_scale": (0.5, 0.2)}, {"local_scale": (0.0, 0.3)}, {"n_local": -1},
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MultiCropAugmentation(**kwargs)


# ------------------------------------------------------------------------------ the recipe


def test_geometry_and_colour_steps_follow_the_official_recipe():
    aug = MultiCropAugmentation()
    for pipeline, size, scale in zip(_pipelines(aug), (224, 224, 98), ((0.32, 1.0),) * 2 + ((0.05, 0.32),)):
        (crop,) = _steps(pipeline, v2.RandomResizedCrop)
        assert tuple(crop.size) == (size, size) and tuple(crop.scale) == scale
        assert crop.interpolation == v2.InterpolationMode.BICUBIC
        assert _steps(pipeline, v2.RandomHorizontalFlip)[0].p == 0.5
        (jitter_step,) = _steps(pipeline, v2.ColorJitter)
        jitter = jitter_step.transforms[0]
        assert jitter_step.p == 0.8
        assert (jitter.brightness, jitter.contrast) == ((0.6, 1.4), (0.6, 1.4))
        assert (jitter.saturation, jitter.hue) == ((0.8, 1.2), (-0.1, 0.1))
        assert _steps(pipeline, v2.RandomGrayscale)[0].p == 0.2
        (blur,) = _steps(pipeline, v2.GaussianBlur)
        assert blur.transforms[0].kernel_size == (9, 9) and list(blur.transforms[0].sigma) == [0.1, 2.0]


@pytest.mark.parametrize(("mode", "expected"), [("faithful", (0.0, 0.9, 0.5)), ("intended", (1.0, 0.1, 0.5))])
def test_blur_probabilities_measured(mode, expected):
    torch.manual_seed(0)
    aug = MultiCropAugmentation(blur=mode)
    assert aug.blur_probabilities == expected == BLUR_PROBABILITIES[mode]
    measured = [_applied_rate(_steps(p, v2.GaussianBlur)[0]) for p in _pipelines(aug)]
    assert measured == pytest.approx(list(expected), abs=TOLERANCE)
    # p = 0 and p = 1 are exact: never / always
    for rate, p in zip(measured, expected):
        if p in (0.0, 1.0):
            assert rate == p


def test_default_is_faithful():
    assert MultiCropAugmentation().blur == "faithful"
    assert MultiCropAugmentation().blur_probabilities == (0.0, 0.9, 0.5)


def test_blur_step_p_is_the_apply_probability():
    # The official GaussianBlur(p) passes 1 - p to RandomApply; ours passes p straight through.
    torch.manual_seed(0)
    assert _applied_rate(blur_step(1.0)) == 1.0
    assert _applied_rate(blur_step(0.0)) == 0.0
    assert _applied_rate(blur_step(0.9)) == pytest.approx(0.9, abs=TOLERANCE)


def test_solarisation_only_on_second_global_crop():
    torch.manual_seed(0)
    aug = MultiCropAugmentation()
    first, second, local = _pipelines(aug)
    assert _steps(first, v2.RandomSolarize) == [] and _steps(local, v2.RandomSolarize) == []
    (solarize,) = _steps(second, v2.RandomSolarize)
    assert solarize.threshold == 128
    assert _applied_rate(solarize) == pytest.approx(0.2, abs=TOLERANCE)


def test_solarisation_threshold_acts_on_8bit_values():
    img = Image.fromarray(np.array([[[100, 128, 200]]], dtype=np.uint8))
    (solarize,) = _steps(MultiCropAugmentation().global_transforms[1], v2.RandomSolarize)
    out = np.asarray(v2.RandomSolarize(threshold=solarize.threshold, p=1.0)(img))
    assert out.tolist() == [[[100, 127, 55]]]  # values >= 128 are inverted
