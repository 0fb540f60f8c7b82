"""Building blocks of the DINOv2 Vision Transformer.

Attribute names mirror the official checkpoint keys (``norm1``, ``attn.qkv``, ``ls1.gamma``,
``mlp.fc1`` / ``mlp.w12`` ...), so official weights load with ``strict=True`` and no renaming.
Optional parts resolve to ``nn.Identity`` in ``__init__`` so ``forward`` has no branches.

Packed sequences: ``Block``, ``Attention`` and ``DropPath`` also take ``(T, D)`` tokens of several
batches of different lengths laid end to end, with ``seq_shapes = ((B1, N1), (B2, N2), ...)``
(``T = sum(Bi * Ni)``). Norms, linear layers and LayerScale then run once on all tokens (one
large matrix product instead of one per crop size), attention runs per group (a token attends
only within its own image), and stochastic depth drops whole images. This is the "one packed
pass" over global and local crops; the official code does the same with xformers'
block-diagonal attention masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SeqShapes = tuple[tuple[int, int], ...]
"""``((B1, N1), (B2, N2), ...)``: batch size and sequence length of each group in a packed tensor."""


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, H/p * W/p, D) patch tokens by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()  # the official module has one; it holds no parameters

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {p}; resize or crop it "
                f"first, e.g. with dinolab.data.transforms.fit_to_patch(x, {p}, mode='crop'|'pad') "
                "or make_dense_transform(), which round to the patch multiple"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, D)


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (CaiT); initialised small so blocks start near identity."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        if seq_shapes is None:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        else:  # packed (T, D): one draw per image, repeated over its tokens
            draws = x.new_empty(sum(b for b, _ in seq_shapes)).bernoulli_(keep).split([b for b, _ in seq_shapes])
            mask = torch.cat([d.unsqueeze(1).expand(b, n).reshape(-1) for d, (b, n) in zip(draws, seq_shapes)])
            mask = mask.unsqueeze(-1)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention`` (flash / mem-efficient kernels)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        if seq_shapes is None:
            B, N, D = x.shape
            return self.proj(self._attend(self.qkv(x), B, N).reshape(B, N, D))
        # packed (T, D): one qkv / proj matmul over all tokens, attention within each group
        qkv = self.qkv(x).split([b * n for b, n in seq_shapes])
        out = [self._attend(part, b, n).flatten(0, 1) for part, (b, n) in zip(qkv, seq_shapes)]
        return self.proj(torch.cat(out))

    def _attend(self, qkv: Tensor, B: int, N: int) -> Tensor:
        """qkv rows of B sequences of N tokens -> attention output (B, N, heads * head_dim)."""
        D = qkv.shape[-1] // 3
        qkv = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return x.transpose(1, 2).reshape(B, N, D)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, the feed-forward network of ViT-S/B/L."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of ViT-g: ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop(ls(attn(norm(x))))`` then the same for the FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden: int,
        *,
        ffn: str = "mlp",
        layerscale: float | None = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        ffn_cls = {"mlp": Mlp, "swiglu": SwiGLUFFN}
        if ffn not in ffn_cls:
            raise ValueError(f"unknown ffn {ffn!r}; choose one of {sorted(ffn_cls)}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ffn_cls[ffn](dim, ffn_hidden)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        """(B, N, D) tokens, or packed (T, D) tokens with their ``seq_shapes`` (module docstring)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), seq_shapes)), seq_shapes)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), seq_shapes)
