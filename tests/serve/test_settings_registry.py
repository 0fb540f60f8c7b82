"""serve.yaml + flags, model resolution (official -> fallback offline), heads, and the CLI edge."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch

from dinolab.cli import main
from dinolab.errors import DinolabError, WeightsNotFoundError
from dinolab.models.checkpoints import save_official
from dinolab.serve import registry as registry_mod
from dinolab.serve.app import create_app
from dinolab.serve.registry import ModelRegistry, resolve_models
from dinolab.serve.settings import ServeSettings, load_settings

from .conftest import local_client, tiny_backbone, tiny_served


def test_yaml_flags_and_relative_paths(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "ckpt.pth").write_bytes(b"")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9001\nindex: idx\nmodels:\n  - model: ckpt.pth\n    short_side: 112\n"
                   "    seg_head: seg.pth\n  - model: dinov2_vitb14\nlimits: {max_upload_mb: 2}\n")
    s = load_settings(cfg)
    assert s.port == 9001 and s.index == str(tmp_path / "idx") and s.limits.max_bytes == 2 * 2**20
    assert s.models[0].model == str(tmp_path / "ckpt.pth")  # exists next to the file: resolved
    assert s.models[0].seg_head == "seg.pth"  # does not exist there: left as given
    s = load_settings(cfg, port=9002, model="dinov2_vits14", timeout_s=5, fallback=False)
    assert (s.port, s.limits.timeout_s, s.fallback) == (9002, 5, "off")  # the earlier boolean form
    assert load_settings(None).fallback == "embedded" and load_settings(None, fallback=True).fallback == "embedded"
    assert load_settings(None, fallback="train").fallback == "train"
    assert s.models[0].model == "dinov2_vits14"
    assert s.models[0].seg_head is None  # a new model drops the old one's head
    assert s.models[0].short_side == 112 and s.models[1].model == "dinov2_vitb14"
    assert load_settings(None).models[0].model == "dinov2_vits14"


@pytest.mark.parametrize("text, words", [
    ("models:\n  - modle: x\n", ["models.0.modle", "valid keys: name, model"]),
    ("limits: {max_pixel: 3}\n", ["limits.max_pixel", "max_pixels"]),
    ("prot: 3\n", ["prot", "valid keys: host, port"]),
    ("port: 70000\n", ["port"]),
    ("models: []\n", ["models"]),
    ("- a\n- b\n", ["must hold a mapping"]),
    ("port: [\n", ["not valid YAML"]),
])
def test_bad_yaml_is_refused_with_the_valid_keys(tmp_path, text, words):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(text)
    with pytest.raises(DinolabError) as e:
        load_settings(cfg)
    for w in words:
        assert w in str(e.value)


def test_registry_names_and_duplicates():
    reg = ModelRegistry([tiny_served("a"), tiny_served("b")])
    assert reg.names() == ["a", "b"] and reg.get(None).name == "a" and reg.get("b").name == "b"
    with pytest.raises(KeyError, match="served: a, b"):
        reg.get("c")
    with pytest.raises(DinolabError, match="two models are named"):
        ModelRegistry([tiny_served("a"), tiny_served("a")])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path


def test_offline_official_name_falls_back_with_one_line(offline, monkeypatch, caplog):
    """No official weights offline, --fallback train: one warning line naming the file and URL, then the
    self-pretrained fallback model."""
    path = save_official(tiny_backbone(), offline / "fallback.pth")
    monkeypatch.setattr("dinolab.serve.fallback.ensure_fallback", lambda **kw: path)
    with caplog.at_level(logging.WARNING, logger="dinolab.serve.registry"):
        reg = resolve_models(ServeSettings(fallback="train"), progress=False)
    (m,) = list(reg)
    assert m.kind == "fallback" and m.short_side == 160
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "dinov2_vits14_pretrain.pth" in warnings[0] and "fallback" in warnings[0]
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in m.notice
    info = local_client(create_app(ServeSettings(), models=reg)).get("/v1/models").json()["models"][0]
    assert info["kind"] == "fallback" and "official dinov2_vits14" in info["notice"]


def test_offline_without_fallback_says_what_to_pass(offline):
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        resolve_models(ServeSettings(fallback="off"), progress=False)
    with pytest.raises(DinolabError, match="does not exist"):  # a path is never replaced by the fallback
        resolve_models(ServeSettings(models=[{"model": str(offline / "missing.pth")}]), progress=False)


def test_checkpoint_paths_and_random_init(tmp_path):
    path = save_official(tiny_backbone(), tmp_path / "mine.pth")
    specs = [{"model": str(path), "short_side": 64},
             {"model": "vit_tiny_patch4", "random_init": True, "name": "rnd"}]
    reg = resolve_models(ServeSettings(models=specs))
    mine, rnd = list(reg)
    assert (mine.name, mine.kind, mine.short_side) == ("mine", "checkpoint", 64)
    assert rnd.kind == "random" and rnd.short_side == 4 * 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(mine.backbone(x).cls_token, tiny_backbone()(x).cls_token, atol=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text("prot: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with socket.socket() as s:  # a taken port fails before any model loads
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "vit_tiny_patch4", "--random-init"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen" in err and "--port" in err


def test_registry_module_keeps_heads_off_the_fallback(offline, monkeypatch, caplog):
    path = save_official(tiny_backbone(), offline / "fallback.pth")
    monkeypatch.setattr("dinolab.serve.fallback.ensure_fallback", lambda **kw: path)
    settings = ServeSettings(models=[{"model": "dinov2_vits14", "depth_head": "dinov2_vits14_nyu_linear4"}],
                             fallback="train")
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        (m,) = list(resolve_models(settings, progress=False))
    assert m.kind == "fallback" and m.depth_head is None
    assert any("not loading heads" in r.getMessage() for r in caplog.records)


def test_offline_default_serves_the_embedded_model_with_its_heads(offline, monkeypatch, caplog):
    """The default fallback: the model shipped in the package, at once (no training), with the CamVid
    segmentation and 7-Scenes depth heads; heads named for the official model are not put on it."""
    from dinolab.models import embedded

    monkeypatch.setattr("dinolab.serve.fallback.ensure_fallback",
                        lambda **kw: pytest.fail("the embedded fallback must not train"))
    settings = ServeSettings(models=[{"model": "dinov2_vits14", "depth_head": "dinov2_vits14_nyu_linear4"}])
    with caplog.at_level(logging.WARNING, logger=registry_mod.__name__):
        (m,) = list(resolve_models(settings, progress=False))
    assert (m.kind, m.name, m.short_side) == ("fallback", embedded.EMBEDDED_NAME, embedded.SHORT_SIDE)
    assert m.seg_head is not None and m.depth_head is not None
    assert "CamVid mIoU" in m.notice and "dinov2_vits14_pretrain.pth" in m.notice
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("embedded model" in w for w in warnings) and any("not loading heads" in w for w in warnings)
    client = local_client(create_app(settings, models=ModelRegistry([m])))
    info = client.get("/v1/models").json()["models"][0]
    assert info["segmentation_head"] and info["depth_head"]
