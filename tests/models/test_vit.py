import math

import pytest
import torch
import torch.nn.functional as F

from dinolab.data.transforms import fit_to_patch
from dinolab.models import create_model


def official_pos_resize(pos, h, w, offset, antialias):
    """The official DINOv2 formula, restated: bicubic from the square grid in fp32, scale factor
    (n + offset) / M when an offset is set, else an explicit size."""
    cls, patch = pos[:, :1], pos[:, 1:].float()
    M = math.isqrt(patch.shape[1])
    if (h, w) == (M, M):  # the official code returns the stored table untouched at its own size
        return pos
    grid = patch.reshape(1, M, M, -1).permute(0, 3, 1, 2)
    kw = {"scale_factor": ((h + offset) / M, (w + offset) / M)} if offset else {"size": (h, w)}
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    return torch.cat([cls, out.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("hw", [(16, 16), (19, 27), (37, 37), (40, 20)])
def test_pos_embed_interpolation_is_the_official_formula(name, hw):
    model = create_model(name, depth=1)
    reg = name.endswith("_reg")
    expected = official_pos_resize(model.pos_embed.detach(), *hw, offset=0.0 if reg else 0.1, antialias=reg)
    got = model.interpolate_pos_encoding(*hw).detach()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mask_token_replaces_masked_patches_only():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch14", depth=1).eval()
    torch.nn.init.normal_(model.mask_token)
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    tokens = model.prepare_tokens(x, masks)
    plain = model.prepare_tokens(x)
    pos = model.interpolate_pos_encoding(4, 4)
    torch.testing.assert_close(tokens[0, 1:6], model.mask_token.expand(5, -1) + pos[0, 1:6])
    torch.testing.assert_close(tokens[0, 6:], plain[0, 6:])
    torch.testing.assert_close(tokens[1], plain[1])
    with pytest.raises(ValueError, match="bool"):
        model(x, masks.float())


def test_intermediate_layers_api():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch14_reg4", depth=4).eval()
    x = torch.randn(2, 3, 42, 70)
    outs = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(outs) == 2 and outs[0][0].shape == (2, 192, 3, 5) and outs[0][1].shape == (2, 192)
    last, cls = outs[-1]
    full = model(x)
    torch.testing.assert_close(cls, full.cls_token)
    torch.testing.assert_close(last, full.patch_map())
    raw = model.get_intermediate_layers(x, n=[0, 3], norm=False)
    torch.testing.assert_close(raw[1], full.prenorm[:, 5:])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[7])


def test_fit_to_patch_crop_and_pad():
    x = torch.randn(1, 3, 30, 45)
    assert fit_to_patch(x, 14, "crop").shape[-2:] == (28, 42)
    padded = fit_to_patch(x, 14, "pad")
    assert padded.shape[-2:] == (42, 56) and torch.equal(padded[..., :30, :45], x)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_packed_pass_equals_separate_passes(name):
    """forward([a, b], masks=[m, None]) = [forward(a, m), forward(b)]: attention stays inside each image."""
    torch.manual_seed(0)
    model = create_model(name, depth=2, layerscale=0.5).eval()
    a, b = torch.randn(3, 3, 42, 56), torch.randn(5, 3, 28, 28)
    masks = torch.rand(3, 12) < 0.4
    packed = model([a, b], masks=[masks, None])
    for got, want in zip(packed, (model(a, masks), model(b)), strict=True):
        assert got.grid == want.grid
        for field in ("cls_token", "register_tokens", "patch_tokens", "prenorm"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-5)
    assert packed[0].masks is masks and packed[1].masks is None
    with pytest.raises(ValueError, match="2 image batches but 1 masks"):
        model([a, b], masks=[masks])


def test_packed_drop_path_drops_whole_images():
    from dinolab.models.layers import DropPath

    torch.manual_seed(0)
    shapes = ((30, 5), (50, 3))  # 30 images of 5 tokens, then 50 images of 3
    x = torch.ones(30 * 5 + 50 * 3, 4)
    y = DropPath(0.5).train()(x, shapes)
    assert set(y.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1 / keep
    images = list(y[:150].view(30, 20)) + list(y[150:].view(50, 12))  # each row: one image's tokens
    assert all((img == img[0]).all() for img in images)  # every token of an image shares its draw
    assert 20 < sum(int(img[0] == 0) for img in images) < 60  # about half of the 80 images dropped
