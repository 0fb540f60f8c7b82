"""CUDA checks: bf16 autocast forward agrees with fp32 and with timm on the same weights."""

import pytest
import torch

from dinolab.models import create_model
from dinolab.models.convert import official_to_timm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_autocast_matches_fp32_and_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_model("dinov2_vits14_reg", img_size=224).cuda().eval()
    peer = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224)
    peer.load_state_dict(official_to_timm(ours.state_dict()))
    peer = peer.cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = ours(x).cls_token
        with torch.autocast("cuda", torch.bfloat16):
            ours16 = ours(x).cls_token.float()
            peer16 = peer.forward_features(x)[:, 0].float()
    cos = torch.nn.functional.cosine_similarity(ours16, ref).min()
    assert cos > 0.999
    torch.testing.assert_close(ours16, peer16, atol=5e-2, rtol=0)
