"""GroupNorm and LayerNorm: torch.nn's classes with the computation done by the core."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm.functional import group_norm, layer_norm

__all__ = ["GroupNorm", "LayerNorm"]

# FX records each call as one node, as it does for torch.nn's layers (see batchnorm.py).
torch.fx.wrap("group_norm")
torch.fx.wrap("layer_norm")


class GroupNorm(nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` (Wu & He, 2018)."""

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (Ba et al., 2016)."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
