"""Linear probe: the classifier grid on cached features, the image-level protocol, its selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dinolab.data.datasets import LabeledImages
from dinolab.data.transforms import make_classification_transform
from dinolab.errors import DinolabError
from dinolab.eval.linear import linear_probe
from dinolab.eval.linear_grid import cosine_factor, linear_input, scale_lr, train_linear_grid
from dinolab.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


KW = {"resize": 32, "crop": 32, "batch_size": 32, "progress": False, "device": "cpu"}
COLOURS = np.array([(220, 30, 30), (30, 200, 40), (40, 40, 230)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch8", depth=4, embed_dim=48, num_heads=3)


def _images(n_per_class: int, seed: int) -> LabeledImages:
    """32x32 images whose class is their (noisy) dominant colour: a random ViT keeps it."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(COLOURS)), n_per_class)
    noise = rng.integers(-25, 26, (len(labels), 32, 32, 3))
    items = np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    ids = [f"{seed}_{i}" for i in range(len(labels))]
    return LabeledImages(items, labels.astype(np.int64), ["red", "green", "blue"], ids)


@pytest.fixture(scope="module")
def data():
    return _images(40, seed=1), _images(20, seed=2)


@pytest.fixture(scope="module")
def probe(model, data):
    return linear_probe(model, *data, augment=False, epochs=10, **KW)


def _toy_features(n: int, num_classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, num_classes, (n,), generator=g)
    cls = means[y][:, None, :] + torch.randn(n, 4, dim, generator=g)  # (N, 4, D)
    return {"cls": cls, "patch_mean": means[y] + torch.randn(n, dim, generator=g)}, y


# ------------------------------------------------------------------------------------------ grid


def test_linear_input_and_schedule_follow_the_official_layout():
    feats = {"cls": torch.arange(24.0).view(1, 4, 6), "patch_mean": -torch.ones(1, 6)}
    assert torch.equal(linear_input(feats, 1, False), feats["cls"][:, 3])
    x = linear_input(feats, 4, True)
    assert x.shape == (1, 30) and torch.equal(x[0, :24], feats["cls"].flatten()) and (x[0, 24:] == -1).all()
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(10, 10) == pytest.approx(0.0)
    assert scale_lr(1e-3, 512) == pytest.approx(2e-3)


def test_grid_learns_separable_features():
    train, test = _toy_features(600, 4, 16, seed=0), _toy_features(300, 4, 16, seed=1)
    out = train_linear_grid(*train, {"test": test}, lrs=(1e-3, 1e-2, 0.1), epochs=5, batch_size=64,
                            device="cpu", progress=False)
    top1 = [m["top1"] for m in out.metrics["test"]]
    assert len(top1) == 3 * 2 * 2 and max(top1) > 99.0
    assert out.predictions["test"].shape == (300, 12)


# --------------------------------------------------------------------------------- linear_probe


def test_probe_reaches_high_accuracy_on_colour_classes(probe, data):
    assert probe.held_out["test_top1"] > 99.0 and probe.official["test_top1"] > 99.0
    assert probe.held_out["selection"] == "held-out" and probe.official["selection"] == "official"
    assert probe.sizes == {"fit": 108, "val": 12, "test": 60}
    assert probe.test_predictions.shape == (60,)
    acc = (probe.test_predictions.numpy() == data[1].labels).mean() * 100
    assert acc == pytest.approx(probe.held_out["test_top1"])


def test_grid_has_every_config_once_with_scaled_lrs(probe):
    configs = {(r["base_lr"], r["n_blocks"], r["avgpool"]) for r in probe.grid}
    assert len(probe.grid) == len(configs) == 13 * 2 * 2
    assert {r["n_blocks"] for r in probe.grid} == {1, 4} and {r["avgpool"] for r in probe.grid} == {False, True}
    assert all(r["lr"] == pytest.approx(r["base_lr"] * 32 / 256) for r in probe.grid)
    assert probe.official["test_top1"] == max(r["test_top1"] for r in probe.grid)


def test_classifier_state_reproduces_the_predictions(probe, model, data):
    cfg, sd = probe.classifier_state["config"], probe.classifier_state["state_dict"]
    assert probe.classifier_state["classes"] == ["red", "green", "blue"]
    assert {k: cfg[k] for k in ("lr", "n_blocks", "avgpool")} == {
        k: probe.held_out[k] for k in ("lr", "n_blocks", "avgpool")}
    assert cfg["in_features"] == 48 * (cfg["n_blocks"] + cfg["avgpool"])
    head = nn.Linear(cfg["in_features"], cfg["num_classes"])
    head.load_state_dict(sd)
    x = make_classification_transform(32, 32)(torch.from_numpy(data[1].items).permute(0, 3, 1, 2))
    with torch.no_grad():
        outs = model.eval().get_intermediate_layers(x, n=cfg["n_blocks"], return_class_token=True)
        feats = {"cls": torch.stack([c for _, c in outs], 1), "patch_mean": outs[-1][0].mean(1)}
        pred = head(linear_input(feats, cfg["n_blocks"], cfg["avgpool"])).argmax(1)
    assert torch.equal(pred, probe.test_predictions)


def test_held_out_selection_never_looks_at_test_labels(model, data, probe):
    train, test = data
    shuffled = test.subset(np.arange(len(test)))
    shuffled.labels = np.random.default_rng(0).permutation(test.labels)
    other = linear_probe(model, train, shuffled, augment=False, epochs=10, **KW)
    keys = ("lr", "n_blocks", "avgpool", "val_top1")
    assert {k: other.held_out[k] for k in keys} == {k: probe.held_out[k] for k in keys}
    assert [r["val_top1"] for r in other.grid] == [r["val_top1"] for r in probe.grid]
    assert torch.equal(other.test_predictions, probe.test_predictions)  # same head, same images
    assert other.held_out["test_top1"] < 90.0  # the labels really changed


def test_same_seed_same_result(model, data, probe):
    again = linear_probe(model, *data, augment=False, epochs=10, **KW)
    assert again.grid == probe.grid  # same seed, same code path, same process: bit-identical by design
    for k, v in probe.classifier_state["state_dict"].items():
        assert torch.equal(v, again.classifier_state["state_dict"][k])


def test_augmented_training_runs_and_is_deterministic(model, data):
    train, test = data
    kw = {**KW, "lrs": (1e-2, 0.1), "n_blocks": (1, 2), "epochs": 1, "augment": True}
    a = linear_probe(model, train, test, **kw)
    b = linear_probe(model, train, test, **kw)
    assert len(a.grid) == 2 * 2 * 2 and a.test_predictions.shape == (len(test),)
    assert a.grid == b.grid  # seeded augmentation, same process: determinism is the claim
    assert set(a.held_out) >= {"lr", "n_blocks", "avgpool", "test_top1", "test_top5"}


# -------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_dinolab_error(model, data):
    train, test = data
    one_class = train.subset(np.flatnonzero(train.labels == 0))
    cases = [
        (nn.Linear(3, 3), train, test, {}, "get_intermediate_layers"),
        (model, train, test, {"n_blocks": (1, 5)}, "depth 4"),
        (model, one_class, test, {}, ">= 2 classes"),
        (model, train, test.subset([]), {}, "test set is empty"),
        (model, train, test, {"val_fraction": 0.0}, "val_fraction"),
        (model, train, test, {"lrs": ()}, "lrs"),
    ]
    for m, tr, te, extra, message in cases:
        with pytest.raises(DinolabError, match=message):
            linear_probe(m, tr, te, **{**KW, "augment": False, **extra})
    feats, y = _toy_features(10, 2, 4, seed=0)
    with pytest.raises(DinolabError, match="CLS tokens"):
        train_linear_grid(feats, y, {}, n_blocks=(8,), device="cpu", progress=False)


def test_image_files_with_an_undecodable_test_image(model, tmp_path):
    """Path items work; a corrupt test file is skipped, predicted -1 and left out of the accuracy."""
    arrays = {"train": _images(6, seed=3), "test": _images(2, seed=4)}
    sets = {}
    for name, ds in arrays.items():
        paths = []
        for i, img in enumerate(ds.items):
            paths.append(tmp_path / f"{name}{i}.png")
            Image.fromarray(img).save(paths[-1])
        sets[name] = LabeledImages(paths, ds.labels, ds.classes, ds.ids)
    sets["test"].items[0].write_bytes(b"not a png")
    for augment in (False, True):
        out = linear_probe(model, sets["train"], sets["test"], augment=augment, epochs=1, lrs=(0.1,), **KW)
        assert out.test_predictions[0] == -1 and (out.test_predictions[1:] >= 0).all()
        assert out.sizes == {"fit": 15, "val": 3, "test": 6}
