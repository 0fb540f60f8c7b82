"""One small converter per foreign layout: HuggingFace ``Dinov2Model`` and timm ``vit_*_dinov2``.

Our parameter names *are* the official checkpoint keys, so "official" needs no converter.
Every converter here is proven by an output-equality test (tests/models/test_parity.py).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# (official suffix inside blocks.N., HF suffix inside encoder.layer.N.)
_HF_BLOCK = [
    ("norm1", "norm1"),
    ("attn.proj", "attention.output.dense"),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
    ("mlp.w12", "mlp.weights_in"),
    ("mlp.w3", "mlp.weights_out"),
    ("ls2.gamma", "layer_scale2.lambda1"),
]
_HF_TOP = [
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    ("norm", "layernorm"),
]


def detect_layout(sd: StateDict) -> str:
    """'official', 'hf' or 'timm', from the key names."""
    if any(k.startswith("embeddings.") for k in sd):
        return "hf"
    if "reg_token" in sd or ("pos_embed" in sd and "mask_token" not in sd):
        return "timm"
    if "pos_embed" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "official"
    raise ValueError("unrecognised checkpoint layout: expected official DINOv2 keys (pos_embed, blocks.N...), "
                     "HuggingFace Dinov2Model keys (embeddings..., encoder.layer.N...) or timm keys")


def _rename(sd: StateDict, pairs: list[tuple[str, str]], reverse: bool) -> StateDict:
    out = {}
    for k, v in sd.items():
        for ours, theirs in pairs:
            src, dst = (theirs, ours) if reverse else (ours, theirs)
            if k == src or k.startswith(src + "."):
                out[dst + k[len(src):]] = v
                break
        else:
            out[k] = v
    return out


# transformers >= 5 renamed modules in memory (hub files keep the names above): new -> hub name
_HF_V5 = [
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.down_proj", "mlp.weights_out"),
]


def _hf_v5_to_hub(sd: StateDict) -> StateDict:
    """Bring transformers-5 in-memory names back to the hub-file names (SwiGLU gate/up re-packed)."""
    out = {}
    for k, v in sd.items():
        for new, old in _HF_V5:
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                break
        out[k] = v
    for k in [k for k in out if ".mlp.gate_proj." in k]:
        up = k.replace("gate_proj", "up_proj")
        out[k.replace("gate_proj", "weights_in")] = torch.cat([out.pop(k), out.pop(up)], dim=0)
    return out


def hf_to_official(sd: StateDict) -> StateDict:
    """HuggingFace ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict (hub files, or a
    transformers-5 model's in-memory names) -> official keys."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items() if not k.startswith("classifier.")}
    sd = _hf_v5_to_hub(sd)
    out = _rename({k: v for k, v in sd.items() if not k.startswith("encoder.layer.")}, _HF_TOP, reverse=True)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    for i in layers:
        pre = f"encoder.layer.{i}."
        block = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        att = "attention.attention."
        for p in ("weight", "bias"):  # HF splits the fused qkv projection into three Linears
            parts = [block.pop(f"{att}{n}.{p}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in parts):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)
        out.update({f"blocks.{i}.{k}": v for k, v in _rename(block, _HF_BLOCK, reverse=True).items()})
    return out


def official_to_hf(sd: StateDict) -> StateDict:
    """Official keys -> the keys of HuggingFace's ``facebook/dinov2-*`` hub files, which every
    transformers version reads with ``from_pretrained`` (see ``save_hf_folder``)."""
    out = _rename({k: v for k, v in sd.items() if not k.startswith("blocks.")}, _HF_TOP, reverse=False)
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", k)
        if not m:
            continue
        i, rest = m.groups()
        pre = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            p = rest.rsplit(".", 1)[1]
            for name, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{pre}attention.attention.{name}.{p}"] = t.clone()
        else:
            out.update({pre + kk: vv for kk, vv in _rename({rest: v}, _HF_BLOCK, reverse=False).items()})
    return out


def timm_to_official(sd: StateDict) -> StateDict:
    """timm ``vit_*_patch14[_reg4]_dinov2`` state dict -> official keys.

    timm drops ``mask_token`` (it becomes zeros, the official initial value) and, for register
    models, stores the CLS position embedding folded into ``cls_token``; we put it back in
    ``cls_token`` with a zero CLS slot in ``pos_embed``, which gives identical outputs.
    """
    out = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    dim = out["cls_token"].shape[-1]
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([out["pos_embed"].new_zeros(1, 1, dim), out["pos_embed"]], dim=1)
    out.setdefault("mask_token", out["cls_token"].new_zeros(1, dim))
    swiglu = {k for k in out if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.weight", k)
              and out[k].shape[0] == 2 * out[k.replace("fc1", "fc2")].shape[1]}
    if swiglu:  # timm's packed SwiGLU: fc1 = [gate; value] like the official w12, fc2 = w3
        out = {re.sub(r"(blocks\.\d+\.mlp\.)fc1", r"\1w12", re.sub(r"(blocks\.\d+\.mlp\.)fc2", r"\1w3", k)): v
               for k, v in out.items()}
    return out


def official_to_timm(sd: StateDict) -> StateDict:
    """Official keys -> timm ``vit_*_patch14[_reg4]_dinov2`` keys (``mask_token`` is dropped)."""
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:  # timm reg models: no pos-embed slot for CLS, folded into cls_token
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return {re.sub(r"(blocks\.\d+\.mlp\.)w12", r"\1fc1", re.sub(r"(blocks\.\d+\.mlp\.)w3", r"\1fc2", k)): v
            for k, v in out.items()}


def to_official(sd: StateDict) -> StateDict:
    """Any supported layout -> official keys."""
    return {"official": dict, "hf": hf_to_official, "timm": timm_to_official}[detect_layout(sd)](sd)


def hf_config(variant, image_size: int = 518) -> dict:
    """``config.json`` contents of a HuggingFace model with this variant's architecture."""
    reg = variant.num_register_tokens
    cfg = {
        "model_type": "dinov2_with_registers" if reg else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if reg else "Dinov2Model"],
        "hidden_size": variant.embed_dim, "num_hidden_layers": variant.depth,
        "num_attention_heads": variant.num_heads, "patch_size": variant.patch_size,
        "image_size": variant.img_size, "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "mlp_ratio": 4,
        "use_swiglu_ffn": variant.ffn == "swiglu", "hidden_act": "gelu", "qkv_bias": True,
    }
    if reg:
        cfg["num_register_tokens"] = reg
    return cfg
