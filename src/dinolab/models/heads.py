"""Projection heads of DINOv2 self-supervised training.

``DINOHead``: 3-layer MLP (GELU) to a 256-d bottleneck, L2 normalisation, then a weight-normalised
linear layer onto K prototypes (65,536 by default). The same class serves the iBOT patch head.
Parameter names follow the official checkpoints (``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight_g``,
``last_layer.weight_v``), so official training checkpoints' heads load as they are.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` per output row (Salimans & Kingma 2016).

    Written out rather than ``torch.nn.utils.parametrizations.weight_norm`` to keep the official
    parameter names ``weight_g`` (K, 1) and ``weight_v`` (K, D). ``g`` starts at 1, so each prototype
    is a unit vector and the logits are cosine similarities.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, D)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear layers, GELU between) -> L2 normalise -> prototypes.

    Args:
        in_dim: backbone width. out_dim: number of prototypes K.
        hidden_dim, bottleneck_dim, nlayers: the MLP (official: 2048, 256, 3).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) tokens -> (..., K) prototype logits (before the temperature)."""
        x = self.mlp(x)  # (..., bottleneck)
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
