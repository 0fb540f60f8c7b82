import json
from pathlib import Path

import pytest
import torch

from dinolab.models import create_model, get_variant, list_models

MANIFEST = json.loads((Path(__file__).parents[1] / "fixtures" / "official_manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_official_variant_keys_and_shapes_match_manifest(name):
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == MANIFEST[name]


def test_eight_official_variants_with_timm_aliases():
    official = list_models(official_only=True)
    assert sorted(official) == sorted(MANIFEST)
    assert get_variant("vit_small_patch14_reg4_dinov2").name == "dinov2_vits14_reg"
    assert get_variant("vit_giant_patch14_dinov2").ffn_hidden == 4096


def test_unknown_name_says_how_to_list():
    with pytest.raises(KeyError, match="list_models"):
        get_variant("dinov2_vitz14")


@pytest.mark.parametrize("name,size", [("vit_tiny_patch4", 32), ("vit_tiny_patch8_reg4", 32), ("vit_small_patch16", 64)])
def test_own_small_variants_run(name, size):
    model = create_model(name, depth=2).eval()
    out = model(torch.randn(2, 3, size, size))
    p = model.patch_size
    assert out.patch_tokens.shape == (2, (size // p) ** 2, model.embed_dim)
    assert out.register_tokens.shape[1] == model.num_register_tokens


def test_non_multiple_input_is_refused_with_advice():
    model = create_model("vit_tiny_patch14", depth=1)
    with pytest.raises(ValueError, match="fit_to_patch"):
        model(torch.randn(1, 3, 225, 224))
