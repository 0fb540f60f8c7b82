import torch

from dinolab.models import create_model
from dinolab.models.inference import optimize_for_inference


def test_bf16_inference_model_agrees_with_fp32():
    torch.manual_seed(0)
    model = create_model("vit_small_patch14", depth=2).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model(x).cls_token
        fast = optimize_for_inference(model, compile=False)  # casts in place
        out = fast(x.to(torch.bfloat16)).cls_token.float()
    assert fast.cls_token.dtype == torch.bfloat16 and not fast.cls_token.requires_grad
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999
