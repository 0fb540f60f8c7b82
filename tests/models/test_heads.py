import torch
import torch.nn.functional as F

from dinolab.models.heads import DINOHead


def test_dino_head_shapes_names_and_cosine_logits():
    torch.manual_seed(0)
    head = DINOHead(384, 1000, hidden_dim=64, bottleneck_dim=32)
    assert {k for k in head.state_dict()} == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v"}
    x = torch.randn(5, 7, 384)
    out = head(x)
    assert out.shape == (5, 7, 1000)
    # g = 1: prototypes are unit vectors and the input is normalised, so logits are cosines in [-1, 1]
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(out, z @ F.normalize(head.last_layer.weight_v, dim=1).T)
    assert out.abs().max() <= 1 + 1e-6


def test_weight_g_scales_logits_and_gets_gradients():
    head = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4, nlayers=1)
    x = torch.randn(3, 16)
    with torch.no_grad():
        base = head(x)
        head.last_layer.weight_g.fill_(2.0)
    torch.testing.assert_close(head(x), 2 * base)
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None
