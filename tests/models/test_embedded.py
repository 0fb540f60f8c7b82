"""The embedded default model shipped in the package: files, hashes, card, loading, and its features."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import dinolab
from dinolab.models import embedded

MAX_BACKBONE_BYTES = 12 * 2**20  # the budget for a file that lives in the repository


def test_files_match_model_json_and_fit_the_budget():
    info = embedded.embedded_info()
    folder = embedded.embedded_dir()
    for name in (embedded.BACKBONE_FILE, embedded.SEG_HEAD_FILE, embedded.DEPTH_HEAD_FILE):
        data = (folder / name).read_bytes()
        assert info["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (folder / embedded.BACKBONE_FILE).stat().st_size <= MAX_BACKBONE_BYTES
    from safetensors import safe_open

    with safe_open(str(folder / embedded.BACKBONE_FILE), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (safe_open is not a dict)


def test_card_states_the_measured_numbers_and_licences():
    info = embedded.embedded_info()
    card = (embedded.embedded_dir() / "MODEL_CARD.md").read_text()
    assert f"{info['segmentation']['miou']:.2f}" in card and f"{info['depth']['rmse']:.3f}" in card
    for row in info["knn"].values():
        assert f"{row['top1']['20']:.2f}" in card
    for words in ("non-commercial", "ImageNet terms", "CC BY-NC 4.0", "benchmarks/embedded_model.py"):
        assert words in card


def test_loads_by_name_in_fp32_and_gives_finite_distinct_features():
    model = dinolab.load_model(embedded.EMBEDDED_NAME)
    assert model.patch_size == 8 and next(model.parameters()).dtype == torch.float32
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert out.patch_tokens.shape == (3, 8 * 12, model.embed_dim)
    assert torch.isfinite(out.cls_token).all()
    cls = torch.nn.functional.normalize(out.cls_token, dim=-1)
    assert (cls @ cls.T - torch.eye(3)).abs().max() < 0.999  # not collapsed to one point


def test_checksum_is_checked(tmp_path, monkeypatch):
    bad = tmp_path / "assets" / "embedded"
    bad.mkdir(parents=True)
    for p in embedded.embedded_dir().iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    info = json.loads((bad / "model.json").read_text())
    info["files"][embedded.BACKBONE_FILE]["sha256"] = "0" * 64
    (bad / "model.json").write_text(json.dumps(info))
    monkeypatch.setattr(embedded, "embedded_dir", lambda: bad)
    embedded.embedded_info.cache_clear()
    try:
        with pytest.raises(dinolab.errors.DinolabError, match="SHA-256"):
            embedded.load_embedded()
    finally:
        embedded.embedded_info.cache_clear()


def test_heads_load_on_the_embedded_backbone():
    from dinolab.serve.heads import load_depth_head, load_seg_head

    model = embedded.load_embedded()
    seg = load_seg_head(str(embedded.embedded_seg_head_path()), model)
    depth = load_depth_head(str(embedded.embedded_depth_head_path()), model)
    assert seg.info() and depth.info()


def test_pca_cli_uses_the_embedded_model_offline(tmp_path, monkeypatch, caplog):
    """`./demo.sh` offline without the official weights: one warning line, then the picture."""
    import logging

    from dinolab.cli import main

    monkeypatch.setenv("DINOLAB_OFFLINE", "1")
    monkeypatch.setenv("DINOLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    out = tmp_path / "pca.png"
    with caplog.at_level(logging.WARNING, logger="dinolab"):
        assert main(["pca", "--samples", "chelsea,coffee", "--out", str(out)]) in (0, None)
    assert out.is_file() and out.stat().st_size > 1000
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dinov2_vits14_pretrain.pth" in w and "embedded model" in w for w in warnings)
    assert main(["pca", "--samples", "chelsea", "--out", str(tmp_path / "x.png"), "--fallback", "off"]) != 0
