"""InstanceNorm layers: torch.nn's classes (arguments, no-batch input, state_dict
migration, channel checks) with the normalization computed by the core."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm.functional import instance_norm

# FX records the call as one node instead of tracing torch's shape checks (see batchnorm.py).
torch.fx.wrap("instance_norm")

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d",
           "LazyInstanceNorm2d", "LazyInstanceNorm3d"]


class _InstanceNormForward:
    """Replaces the single call to the functional op in torch's ``_InstanceNorm.forward``."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return instance_norm(input, self.running_mean, self.running_var, self.weight,
                             self.bias, self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return self._apply_instance_norm(input)
        return super().forward(input)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """Drop-in for :class:`torch.nn.InstanceNorm1d` on (N, C, L) or (C, L) input."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """Drop-in for :class:`torch.nn.InstanceNorm2d` on (N, C, H, W) or (C, H, W) input."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """Drop-in for :class:`torch.nn.InstanceNorm3d` on (N, C, D, H, W) or (C, D, H, W)."""


class LazyInstanceNorm1d(_InstanceNormForward, nn.LazyInstanceNorm1d):
    """:class:`torch.nn.LazyInstanceNorm1d` that becomes :class:`InstanceNorm1d`."""

    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_InstanceNormForward, nn.LazyInstanceNorm2d):
    """:class:`torch.nn.LazyInstanceNorm2d` that becomes :class:`InstanceNorm2d`."""

    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_InstanceNormForward, nn.LazyInstanceNorm3d):
    """:class:`torch.nn.LazyInstanceNorm3d` that becomes :class:`InstanceNorm3d`."""

    cls_to_become = InstanceNorm3d
