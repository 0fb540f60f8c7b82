"""Numerical parity with independent implementations (HuggingFace transformers, timm), same weights.

Where a peer resizes position embeddings differently from the official code, the peer is patched
with the official formula (restated in test_vit.official_pos_resize) and that is said here:
- HF ``Dinov2Model`` (no registers) resizes to an explicit size with no 0.1 offset: patched.
- timm ``vit_*_patch14_dinov2`` (no registers) resizes to an explicit size *with* antialias: patched.
- HF ``Dinov2WithRegistersModel`` and timm ``*_reg4_dinov2`` match the official register models as is.
"""

from __future__ import annotations

import pytest
import torch

from dinolab.models import DinoVisionTransformer, create_model, get_variant
from dinolab.models.checkpoints import save_hf_folder
from dinolab.models.convert import hf_to_official, official_to_timm, timm_to_official
from tests.models.test_vit import official_pos_resize

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-4
SIZES = [(224, 224), (266, 378)]
CASES = [("dinov2_vits14", {}), ("dinov2_vitb14", {}), ("dinov2_vitg14", {"depth": 2})]


def randomized(name: str, seed: int = 0, **overrides) -> DinoVisionTransformer:
    """Our model with every parameter random (LayerScale ~ 1, not 1e-5, so blocks matter)."""
    model = create_model(name, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if k.endswith(("gamma",)) or ("norm" in k and k.endswith("weight")):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def hf_model(ours: DinoVisionTransformer, folder):
    """HF model read by ``from_pretrained`` from the folder our exporter writes (hub key names)."""
    save_hf_folder(ours, folder)
    cls = transformers.Dinov2WithRegistersModel if ours.num_register_tokens else transformers.Dinov2Model
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def timm_model(name: str, **overrides):
    v = get_variant(name, **overrides)
    kw = {"depth": overrides["depth"]} if "depth" in overrides else {}
    return timm.create_model(v.aliases[0], pretrained=False, num_classes=0, dynamic_img_size=True, **kw).eval()


def patch_hf_official_interp(model, monkeypatch):
    emb = model.embeddings

    def interp(embeddings, height, width):
        return official_pos_resize(emb.position_embeddings, height // 14, width // 14, offset=0.1, antialias=False)

    monkeypatch.setattr(emb, "interpolate_pos_encoding", interp)


def patch_timm_official_interp(monkeypatch):
    import timm.models.vision_transformer as tvit

    def resample(posemb, new_size, old_size=None, num_prefix_tokens=1, **_):
        return official_pos_resize(posemb, *new_size, offset=0.1, antialias=False)

    monkeypatch.setattr(tvit, "resample_abs_pos_embed", resample)


def assert_tokens_close(ours, peer_tokens, num_prefix):
    torch.testing.assert_close(ours.cls_token, peer_tokens[:, 0], rtol=0, atol=TOL)
    torch.testing.assert_close(ours.patch_tokens, peer_tokens[:, num_prefix:], rtol=0, atol=TOL)


@pytest.mark.parametrize("reg", [False, True], ids=["noreg", "reg4"])
@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_hf_parity_and_round_trip(name, overrides, reg, monkeypatch, tmp_path):
    name = name + ("_reg" if reg else "")
    ours = randomized(name, **overrides)
    hf = hf_model(ours, tmp_path / "hf")
    if not reg:
        patch_hf_official_interp(hf, monkeypatch)
    back = create_model(name, **overrides).eval()
    back.load_state_dict(hf_to_official(hf.state_dict()), strict=True)  # official -> HF -> ours
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            peer = hf(pixel_values=x).last_hidden_state
            assert_tokens_close(ours(x), peer, ours.num_prefix_tokens)
            assert_tokens_close(back(x), peer, ours.num_prefix_tokens)


@pytest.mark.parametrize("reg", [False, True], ids=["noreg", "reg4"])
@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_timm_parity_and_round_trip(name, overrides, reg, monkeypatch):
    name = name + ("_reg" if reg else "")
    ours = randomized(name, **overrides)
    peer = timm_model(name, **overrides)
    peer.load_state_dict(official_to_timm(ours.state_dict()), strict=True)
    if not reg:
        patch_timm_official_interp(monkeypatch)
    back = create_model(name, **overrides).eval()
    back.load_state_dict(timm_to_official(peer.state_dict()), strict=True)  # official -> timm -> ours
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            tokens = peer.forward_features(x)
            assert_tokens_close(ours(x), tokens, ours.num_prefix_tokens)
            assert_tokens_close(back(x), tokens, ours.num_prefix_tokens)


def test_hf_mask_token_and_intermediate_layers(tmp_path):
    ours = randomized("dinov2_vits14", depth=4)
    hf = hf_model(ours, tmp_path)
    x = torch.randn(2, 3, 518, 518)  # native 37 x 37 grid: no interpolation on either side
    masks = torch.rand(2, 37 * 37) < 0.4
    with torch.no_grad():
        out = hf(pixel_values=x, bool_masked_pos=masks)
        assert_tokens_close(ours(x, masks=masks), out.last_hidden_state, 1)
        out = hf(pixel_values=x, output_hidden_states=True)
        inter = ours.get_intermediate_layers(x, n=4, return_class_token=True)
        for (patch, cls), hidden in zip(inter, out.hidden_states[1:]):
            normed = hf.layernorm(hidden)
            torch.testing.assert_close(cls, normed[:, 0], rtol=0, atol=TOL)
            torch.testing.assert_close(patch, normed[:, 1:], rtol=0, atol=TOL)


def test_hf_default_interpolation_differs_from_official(tmp_path):
    """Documents why the HF no-register model is patched above: its own resize is not the official one."""
    ours = randomized("dinov2_vits14", depth=1)
    hf = hf_model(ours, tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x).patch_tokens - hf(pixel_values=x).last_hidden_state[:, 1:]).abs().max()
    assert diff > 1e-3
