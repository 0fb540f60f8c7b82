"""The DINOv2 Vision Transformer backbone, read top to bottom like the paper.

Token story (``prepare_tokens``): patchify -> optionally swap masked patches for ``mask_token``
-> prepend CLS -> add (interpolated) position embeddings -> insert register tokens after CLS
(registers get no position embedding). Blocks, final LayerNorm, typed output.

Parameter names equal the official checkpoint keys; see ``dinolab.models.checkpoints``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.models.layers import Block, PatchEmbed


@dataclass(frozen=True)
class BackboneOutput:
    """What the backbone returns; the type never depends on a flag.

    Attributes:
        cls_token: (B, D) final-normed CLS token, the global image feature.
        register_tokens: (B, R, D) final-normed register tokens (R = 0 without registers).
        patch_tokens: (B, N, D) final-normed patch tokens, N = h * w, row-major.
        prenorm: (B, 1 + R + N, D) all tokens before the final LayerNorm.
        grid: (h, w), the patch grid of the input.
        masks: (B, N) boolean iBOT mask that was applied, or ``None``.
    """

    cls_token: Tensor
    register_tokens: Tensor
    patch_tokens: Tensor
    prenorm: Tensor
    grid: tuple[int, int]
    masks: Tensor | None = None

    def patch_map(self) -> Tensor:
        """Patch tokens as a feature map (B, D, h, w)."""
        B, _, D = self.patch_tokens.shape
        return self.patch_tokens.transpose(1, 2).reshape(B, D, *self.grid)

    def as_official_dict(self) -> dict[str, Tensor | None]:
        """The dict the official ``forward_features`` returns (``x_norm_clstoken`` ...)."""
        return {
            "x_norm_clstoken": self.cls_token,
            "x_norm_regtokens": self.register_tokens,
            "x_norm_patchtokens": self.patch_tokens,
            "x_prenorm": self.prenorm,
            "masks": self.masks,
        }


class DinoVisionTransformer(nn.Module):
    """ViT backbone of DINOv2 (with or without register tokens).

    Args:
        img_size: side of the square image the position-embedding grid was trained for
            (518 for the official weights: a 37 x 37 grid at patch 14).
        patch_size: side of a square patch in pixels.
        embed_dim, depth, num_heads: transformer width, number of blocks, attention heads.
        ffn: ``"mlp"`` (GELU MLP) or ``"swiglu"`` (ViT-g).
        ffn_hidden: hidden width of the feed-forward network.
        num_register_tokens: extra learnt tokens (0 or 4 in the official models).
        layerscale: LayerScale init value; ``None`` disables LayerScale.
        drop_path_rate: stochastic depth of the last block (uniform across blocks, as DINOv2).
        interpolate_offset: the official "+0.1" scale-factor kludge when resizing position
            embeddings (0.1 for the original models; 0 means "resize to an explicit size").
        interpolate_antialias: antialiased bicubic resize (True for the register models).
    """

    def __init__(
        self,
        *,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        ffn: str = "mlp",
        ffn_hidden: int | None = None,
        num_register_tokens: int = 0,
        layerscale: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_parameter("register_tokens", None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn_hidden or 4 * embed_dim,
                ffn=ffn,
                layerscale=layerscale,
                drop_path=drop_path_rate,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + registers, the tokens in front of the patch tokens."""
        return 1 + self.num_register_tokens

    def init_weights(self) -> None:
        """Truncated-normal init of the official code (std 0.02, CLS/registers 1e-6, pos 0.02)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embeddings (1, 1 + h*w, D) for an h x w patch grid.

        Resized from the stored square grid in fp32 with bicubic interpolation, exactly as the
        official code: models without registers pass a scale factor ``(h + 0.1) / M`` (the old
        DINO kludge) without antialiasing; register models pass the explicit size, antialiased.
        """
        pos = self.pos_embed
        M = math.isqrt(pos.shape[1] - 1)
        if h == M and w == M:
            return pos
        cls_pos, patch_pos = pos[:, :1].float(), pos[:, 1:].float()
        patch_pos = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M)
            resize = {"scale_factor": scale}
        else:
            resize = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if patch_pos.shape[-2:] != (h, w):  # the scale-factor path must land on the grid exactly
            raise RuntimeError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, wanted {(h, w)}")
        patch_pos = patch_pos.flatten(2).transpose(1, 2)  # (1, h*w, D)
        return torch.cat((cls_pos, patch_pos), dim=1).to(pos.dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, C, H, W) images -> (B, 1 + R + N, D) tokens entering the first block."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if masks.shape != x.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape {tuple(x.shape[:2])}, got "
                                 f"{masks.dtype} {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.register_tokens is not None:  # registers go after CLS and carry no position
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        """Run the backbone; ``masks`` (B, N) bool swaps masked patches for ``mask_token``."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        t = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            t = blk(t)
        return self._output(t, grid, masks)

    def forward_features_list(self, xs: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None
                              ) -> list[BackboneOutput]:
        """Several batches of different image sizes in one packed pass (``dinolab.models.layers``).

        Equal to ``[forward_features(x, m) for x, m in zip(xs, masks)]`` up to float rounding, with
        one matrix product per linear layer for all batches together; attention stays within
        each image. DINOv2 training runs the global and the local crops this way.
        """
        masks = list(masks) if masks is not None else [None] * len(xs)
        if len(masks) != len(xs):
            raise ValueError(f"got {len(xs)} image batches but {len(masks)} masks")
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        shapes = tuple((t.shape[0], t.shape[1]) for t in tokens)
        t = torch.cat([t.flatten(0, 1) for t in tokens])  # (sum B_i * N_i, D)
        for blk in self.blocks:
            t = blk(t, shapes)
        outs = []
        for part, (b, n), x, m in zip(t.split([b * n for b, n in shapes]), shapes, xs, masks):
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
            outs.append(self._output(part.view(b, n, -1), grid, m))
        return outs

    def _output(self, t: Tensor, grid: tuple[int, int], masks: Tensor | None) -> BackboneOutput:
        normed = self.norm(t)
        r = self.num_prefix_tokens
        return BackboneOutput(
            cls_token=normed[:, 0],
            register_tokens=normed[:, 1:r],
            patch_tokens=normed[:, r:],
            prenorm=t,
            grid=grid,
            masks=masks,
        )

    def forward(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
                ) -> BackboneOutput | list[BackboneOutput]:
        """``forward_features``; a list of batches goes through ``forward_features_list`` (packed),
        so wrappers that hook ``forward`` (DDP, FSDP2, compile) see both kinds of call."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        return self.forward_features(x, masks)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), official API.

        Returns a tuple of patch tokens (B, N, D) — or (B, D, h, w) with ``reshape`` — one per
        chosen block; with ``return_class_token`` each entry is ``(patch_tokens, cls_token)``.
        """
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or not wanted <= set(range(depth)):
            raise ValueError(f"block indices {sorted(wanted)} out of range for depth {depth}")
        t = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                outs.append(self.norm(t) if norm else t)
            if i == max(wanted):
                break
        r = self.num_prefix_tokens
        cls_tokens = [o[:, 0] for o in outs]
        patches = [o[:, r:] for o in outs]
        if reshape:
            B, h, w = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [p.transpose(1, 2).reshape(B, -1, h, w).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)
