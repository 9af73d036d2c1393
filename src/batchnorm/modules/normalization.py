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
        if torch.jit.is_scripting():  # the operator group_norm calls, which checks the shapes
            return torch.ops.batchnorm.group_norm(input, self.weight, self.bias,
                                                  self.num_groups, self.eps)[0]
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (Ba et al., 2016)."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """The shape check of :func:`layer_norm` and the operator it calls, in TorchScript."""
        shape = list(self.normalized_shape)
        ndim = len(shape)
        if ndim == 0 or input.dim() < ndim or input.shape[input.dim() - ndim:] != shape:
            raise RuntimeError(f"Given normalized_shape={shape}, expected input with shape "
                               f"[*, {', '.join([str(size) for size in shape])}], but got "
                               f"input of size{input.shape}")
        return torch.ops.batchnorm.layer_norm(input, ndim, self.weight, self.bias, self.eps)[0]
