"""Config schema, presets, overrides, ``base:`` inheritance, round trip and validation."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from dinolab.config import (
    Config,
    backbone_kwargs,
    config_to_dict,
    ibot_head_dims,
    iters_per_epoch,
    list_presets,
    load_config,
    lr_scaling,
    save_config,
    scaled_lr,
    validate,
)
from dinolab.errors import DinolabError
from dinolab.models import DinoVisionTransformer
from dinolab.models.variants import get_variant
from dinolab.train.schedules import scale_lr

PRESETS = ["vits14", "vitb14", "vitl14", "vitg14", "cifar10", "cpu-smoke"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    validate(cfg)
    patch = get_variant(cfg.model.arch).patch_size
    assert cfg.crops.global_size % patch == 0 and cfg.crops.local_size % patch == 0
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_presets_are_listed():
    assert set(PRESETS) <= set(list_presets())


def test_defaults_are_the_official_ssl_default_config():
    cfg = Config()
    assert (cfg.optim.base_lr, cfg.optim.scaling_rule) == (0.004, "sqrt_wrt_1024")
    assert (cfg.train.batch_size_per_gpu, cfg.train.iters_per_epoch) == (64, 1250)
    assert (cfg.head.out_dim, cfg.head.bottleneck_dim, cfg.loss.koleo_weight) == (65536, 256, 0.1)
    assert cfg.crops.global_scale == (0.32, 1.0) and cfg.mask.ratio == (0.1, 0.5)


def test_official_large_and_giant_recipes():
    large, giant = load_config("vitl14"), load_config("vitg14")
    assert (large.optim.base_lr, large.train.epochs, large.optim.warmup_epochs) == (2e-4, 500, 80)
    assert (large.loss.centering, large.model.drop_path_rate, large.optim.momentum_teacher) == (
        "sinkhorn_knopp", 0.4, 0.994)
    assert ibot_head_dims(large.head) == {"out_dim": 131072, "hidden_dim": 2048, "bottleneck_dim": 256,
                                          "nlayers": 3}
    kwargs = backbone_kwargs(large.model)
    assert (kwargs["ffn"], kwargs["ffn_hidden"]) == ("swiglu", 2736)  # official SwiGLUFFNFused width for 1024
    assert backbone_kwargs(giant.model)["ffn_hidden"] == 4096 and kwargs["img_size"] == 224
    # vitg14 inherits vitl14 through ``base:`` and changes only the backbone, the batch and the sharding
    assert giant.train.batch_size_per_gpu == 12 and giant.model.arch == "dinov2_vitg14"
    assert (giant.train.parallel, giant.train.activation_checkpointing) == ("fsdp", True)
    assert (large.train.parallel, large.train.activation_checkpointing) == ("auto", False)
    assert dataclasses.replace(giant, model=large.model, train=dataclasses.replace(
        giant.train, batch_size_per_gpu=32, parallel="auto", activation_checkpointing=False)) == large


def test_overrides_of_each_type():
    cfg = load_config("cpu-smoke", [
        "optim.base_lr=1e-3",  # YAML 1.1 reads this as a string; a float field accepts it
        "optim.min_lr=0",  # int widens to float
        "crops.global_scale=[0.4,1.0]",
        "train.epochs=5",
        "head.separate_ibot_head=true",
        "head.ibot_out_dim=128",
        "loss.centering=sinkhorn_knopp",
        "model.num_register_tokens=4",
        "train.output_dir=2024",  # a string field keeps the text
        "train.dataset_path=/data/imgs",
        "mask={probability: 0.25}",  # a whole section merges field by field
    ])
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.crops.global_scale == (0.4, 1.0) and cfg.train.epochs == 5
    assert cfg.head.separate_ibot_head and ibot_head_dims(cfg.head)["out_dim"] == 128
    assert cfg.loss.centering == "sinkhorn_knopp" and cfg.model.num_register_tokens == 4
    assert cfg.train.output_dir == "2024" and cfg.train.dataset_path == "/data/imgs"
    assert cfg.mask.probability == 0.25 and cfg.mask.ratio == (0.1, 0.5)
    # the preset itself is unchanged
    assert load_config("cpu-smoke").train.epochs != 5


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(DinolabError, match=r"optim\.base_lrr.*did you mean 'base_lr'.*warmup_epochs"):
        load_config("cpu-smoke", ["optim.base_lrr=1e-3"])
    with pytest.raises(DinolabError, match="valid keys at the top level: model, head, crops"):
        load_config("cpu-smoke", ["optm.base_lr=1e-3"])
    path = tmp_path / "typo.yaml"
    path.write_text("base: cpu-smoke\ntrain:\n  epoch: 3\n")
    with pytest.raises(DinolabError, match=r"train\.epoch\b.*did you mean 'epochs'"):
        load_config(path)


@pytest.mark.parametrize("override, pattern", [
    ("train.epochs=2.5", r"train\.epochs: expected int, got float"),
    ("train.epochs=true", r"train\.epochs: expected int, got bool"),
    ("optim.base_lr=fast", r"optim\.base_lr: expected float"),
    ("crops.global_scale=0.4", r"crops\.global_scale: expected a list of 2"),
    ("crops.global_scale=[0.4,x]", r"crops\.global_scale\[1\]: expected float"),
    ("loss.centering=centre", r"loss\.centering: expected one of 'softmax_center', 'sinkhorn_knopp'"),
    ("head.separate_ibot_head=2", r"expected bool"),
    ("train.epochs.x=1", r"'train\.epochs' is a value"),
    ("train.epochs", r"not of the form"),
])
def test_type_errors(override, pattern):
    with pytest.raises(DinolabError, match=pattern):
        load_config("cpu-smoke", [override])


def test_base_inheritance_from_user_yaml(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: cifar10\noptim:\n  base_lr: 1.0e-3\ncrops:\n  n_local: 4\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ntrain:\n  epochs: 17\n")  # relative to the file
    cfg = load_config(tmp_path / "child.yaml", ["crops.n_local=6"])
    cifar = load_config("cifar10")
    assert (cfg.optim.base_lr, cfg.train.epochs, cfg.crops.n_local) == (1e-3, 17, 6)
    assert cfg.crops.global_scale == cifar.crops.global_scale and cfg.model == cifar.model
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(DinolabError, match="loops"):
        load_config(tmp_path / "loop.yaml")
    with pytest.raises(DinolabError, match="no preset or file named 'vitx14'.*cifar10"):
        load_config("vitx14")


def test_save_writes_plain_yaml(tmp_path):
    cfg = load_config("vitl14", ["optim.betas=[0.9,0.99]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert "betas: [0.9, 0.99]" in path.read_text()
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.99]
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, pattern", [
    (["crops.local_size=18"], r"crops\.local_size=18 is not a positive multiple of the patch size 4 .*16"),
    (["crops.global_scale=[0.0,1.0]"], r"crops\.global_scale=\[0.0, 1.0\] must satisfy 0 < min"),
    (["crops.global_size=16", "crops.local_size=32", "model.img_size=16"], "larger than crops.global_size"),
    (["mask.ratio=[0.2,1.5]"], r"mask\.ratio=\[0.2, 1.5\]"),
    (["mask.probability=-0.1"], r"mask\.probability"),
    (["train.batch_size_per_gpu=0"], r"batch_size_per_gpu=0 must be >= 1"),
    (["crops.local_scale=[0.5,0.1]"], r"crops\.local_scale"),
    (["head.ibot_out_dim=64"], "shares the DINO head"),
    (["optim.scaling_rule=sqrt"], "sqrt_wrt_<N>"),
    (["train.epochs=1", "optim.warmup_epochs=2"], r"warmup_epochs=2 is not in \[0, train.epochs=1\]"),
    (["model.arch=vit_nope"], "unknown model 'vit_nope'"),
])
def test_validation_errors(overrides, pattern):
    with pytest.raises(DinolabError, match=pattern):
        load_config("cpu-smoke", overrides)


def test_validation_reports_every_problem_at_once():
    cfg = load_config("vits14")
    bad = dataclasses.replace(cfg, crops=dataclasses.replace(cfg.crops, local_size=96),
                              train=dataclasses.replace(cfg.train, epochs=0))
    with pytest.raises(DinolabError, match=r"local_size=96 .* patch size 14.*train\.epochs=0"):
        validate(bad)


def test_derived_values_are_pure_functions():
    cfg = load_config("vits14")  # 64 per GPU
    assert lr_scaling("sqrt_wrt_1024") == ("sqrt", 1024) and lr_scaling("linear_wrt_256") == ("linear", 256)
    assert math.isclose(scaled_lr(cfg, world_size=16), 0.004)  # 64 x 16 = 1024
    assert math.isclose(scaled_lr(cfg, world_size=4), scale_lr(0.004, 256, "sqrt", 1024))
    assert iters_per_epoch(cfg, dataset_size=10) == 1250
    cifar = load_config("cifar10")  # iters_per_epoch 0: one pass of 512-image batches
    assert iters_per_epoch(cifar, dataset_size=50_000) == 97
    smoke = backbone_kwargs(load_config("cpu-smoke").model)
    assert smoke == get_variant("vit_tiny_patch4", depth=2).model_kwargs() | {"drop_path_rate": 0.1,
                                                                              "layerscale": 1e-5}
    assert len(DinoVisionTransformer(**smoke).blocks) == 2


@pytest.mark.parametrize("override", ["optim.base_lr=inf", "optim.base_lr=.inf", "optim.clip_grad=.nan",
                                      "optim.weight_decay_end=.nan", "loss.teacher_temp=.nan", "optim.min_lr=-inf",
                                      "crops.global_scale=[0.3,.nan]", "model.layerscale=nan", "optim.base_lr=1e999"])
def test_non_finite_floats_are_refused_at_load(override):
    key = override.split("=")[0].split("[")[0]
    with pytest.raises(DinolabError, match=rf"{re.escape(key)}.*expected a finite number"):
        load_config("cpu-smoke", [override])


def test_non_finite_floats_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("base: cpu-smoke\noptim:\n  weight_decay_end: .nan\n")
    with pytest.raises(DinolabError, match=r"optim\.weight_decay_end: expected a finite number"):
        load_config(path)


PAYLOAD = "!!python/object/apply:os.system [\"touch {marker}\"]"


def test_train_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"base: cpu-smoke\ntrain:\n  seed: {PAYLOAD.format(marker=marker)}\n")
    with pytest.raises(DinolabError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(DinolabError, match="not valid YAML"):
        load_config("cpu-smoke", [f"train.seed={PAYLOAD.format(marker=marker)}"])
    assert not marker.exists()


def test_curate_yaml_with_python_tags_is_refused(tmp_path):
    from dinolab.curate.config import load_curate_config

    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"dedup:\n  threshold: {PAYLOAD.format(marker=marker)}\n")
    with pytest.raises(DinolabError, match="YAML"):
        load_curate_config(path)
    with pytest.raises(DinolabError, match="YAML"):
        load_curate_config(None, [f"dedup.threshold={PAYLOAD.format(marker=marker)}"])
    assert not marker.exists()
