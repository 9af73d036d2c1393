"""GroupNorm and LayerNorm: torch.nn's classes with the computation done by the core."""

from __future__ import annotations

from torch import Tensor, nn

from batchnorm import functional as F

__all__ = ["GroupNorm", "LayerNorm"]


class GroupNorm(nn.GroupNorm):
    """Drop-in for :class:`torch.nn.GroupNorm` (Wu & He, 2018)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (Ba et al., 2016)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
