import pytest
import torch
from torch import nn

from dinolab.models import create_model
from dinolab.train.optim import apply_schedules, make_adamw, param_groups

DEPTH, RATE = 4, 0.9
TOKENS = ("cls_token", "pos_embed", "mask_token", "register_tokens")


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHead(nn.Module):
    """The shape of a DINO head: an MLP, a LayerNorm-free bottleneck, a weight-normed ``last_layer``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, 16))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(16, 64, bias=False))


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_model("vit_tiny_patch4", depth=DEPTH, num_register_tokens=4)
        self.dino_head = FakeHead(self.backbone.embed_dim)


def expected_lr_mult(rel: str) -> float:
    """The rule restated by hand for the names of our ViT."""
    if rel.startswith("patch_embed."):
        return RATE ** (DEPTH + 1) * 0.2
    if rel in TOKENS:
        return RATE ** (DEPTH + 1)
    if rel.startswith("blocks."):
        return RATE ** (DEPTH - int(rel.split(".")[1]))
    return 1.0  # final norm, heads


def expected_no_wd(rel: str) -> bool:
    last = rel.split(".")[-1]
    return last == "bias" or ".norm" in f".{rel}" or last == "gamma" or rel in TOKENS


def by_name(groups):
    out = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name, p in zip(g["param_names"], g["params"]):
            assert name not in out, f"{name} is in two groups"
            out[name] = (g, p)
    return out


@pytest.mark.parametrize("prefix", ["", "student."])
def test_groups_cover_every_parameter_once_with_official_factors(prefix):
    model = Student() if not prefix else nn.ModuleDict({"student": Student()})
    groups = param_groups(model, lr_decay_rate=RATE, patch_embed_lr_mult=0.2)
    named = by_name(groups)
    assert set(named) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        g, q = named[name]
        assert q is p
        rel = name.removeprefix(prefix)
        if rel.startswith("backbone."):
            rel = rel.removeprefix("backbone.")
            assert g["lr_multiplier"] == pytest.approx(expected_lr_mult(rel), rel=1e-12), name
            assert g["wd_multiplier"] == (0.0 if expected_no_wd(rel) else 1.0), name
        else:  # head
            assert g["lr_multiplier"] == 1.0
            assert g["wd_multiplier"] == (0.0 if rel.endswith(".bias") else 1.0), name
        assert g["is_last_layer"] == (".last_layer." in name), name
    # one group per distinct (lr, wd, last-layer) triple keeps the optimizer small
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys)) <= 2 * (DEPTH + 3) + 1


def test_spot_values_and_exempt_set_on_bare_backbone():
    model = create_model("vit_tiny_patch4", depth=DEPTH)
    named = by_name(param_groups(model))
    assert named["blocks.0.attn.qkv.weight"][0]["lr_multiplier"] == pytest.approx(0.9**4)
    assert named["blocks.3.mlp.fc1.weight"][0]["lr_multiplier"] == pytest.approx(0.9**1)
    assert named["norm.weight"][0]["lr_multiplier"] == 1.0
    assert named["cls_token"][0]["lr_multiplier"] == pytest.approx(0.9**5)
    assert named["patch_embed.proj.weight"][0]["lr_multiplier"] == pytest.approx(0.9**5 * 0.2)
    no_wd = {n for n, (g, _) in named.items() if g["wd_multiplier"] == 0.0}
    expected = {n for n, p in model.named_parameters() if p.ndim <= 1 or n in TOKENS}
    assert no_wd == expected  # biases, norms, gammas (all 1-D here) and the tokens, nothing else
    assert not any(g["is_last_layer"] for g, _ in named.values())


def test_frozen_parameters_are_left_out():
    model = create_model("vit_tiny_patch4", depth=2)
    model.mask_token.requires_grad_(False)
    assert "mask_token" not in by_name(param_groups(model))


def test_apply_schedules_sets_lr_and_wd():
    model = Student()
    opt = make_adamw(param_groups(model), betas=(0.9, 0.95))
    assert opt.defaults["betas"] == (0.9, 0.95)
    apply_schedules(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        base = 0.0 if g["is_last_layer"] else 1e-3
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    last = next(g for g in opt.param_groups if g["is_last_layer"])
    apply_schedules(opt, lr=1e-3, wd=0.1, last_layer_lr=5e-4)
    assert last["lr"] == pytest.approx(5e-4)


def test_optimizer_steps_and_frozen_last_layer_stays_put():
    model = Student()
    opt = make_adamw(param_groups(model))
    apply_schedules(opt, lr=1e-2, wd=0.04, last_layer_lr=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    out = model.dino_head.last_layer(model.dino_head.mlp(model.backbone(x).cls_token))
    out.square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (".last_layer." not in n and n != "backbone.mask_token"), n
    state = opt.state_dict()
    assert all("param_names" in g and "lr_multiplier" in g for g in state["param_groups"])


def test_wrapped_backbone_names_are_understood():
    plain = create_model("vit_tiny_patch4", depth=DEPTH)
    compiled = torch.compile(plain)  # lazy: nothing compiles until called
    got = by_name(param_groups(compiled))
    want = by_name(param_groups(plain))
    assert set(got) == {f"_orig_mod.{n}" for n in want}
    for n, (g, _) in want.items():
        other = got[f"_orig_mod.{n}"][0]
        assert (other["lr_multiplier"], other["wd_multiplier"]) == (g["lr_multiplier"], g["wd_multiplier"])


def test_fused_adamw_only_for_plain_cuda_parameters():
    from dinolab.train.build import use_fused_adamw

    cpu = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    assert not use_fused_adamw(cpu)
    assert not use_fused_adamw([])
    frozen_only = [nn.Parameter(torch.zeros(2), requires_grad=False)]
    assert not use_fused_adamw(frozen_only)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda_builds_and_steps():
    from dinolab.config import load_config
    from dinolab.train.build import build_arch, build_optimizer, use_fused_adamw

    arch = build_arch(load_config("cpu-smoke")).cuda()
    assert use_fused_adamw(arch.student.parameters())
    opt = build_optimizer(load_config("cpu-smoke"), arch)
    assert all(g.get("fused") for g in opt.param_groups)
    for p in arch.student.parameters():
        p.grad = torch.ones_like(p)
    apply_schedules(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
    before = next(arch.student.parameters()).detach().clone()
    opt.step()
    assert not torch.equal(before, next(arch.student.parameters()))
