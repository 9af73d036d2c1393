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
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0
        if torch.jit.is_scripting():
            # the operator instance_norm calls: BatchNorm with chunks of one sample
            if use_input_stats and input.numel() // max(input.size(0) * input.size(1), 1) == 1:
                raise ValueError("Expected more than 1 spatial element when training, got "
                                 f"input size {input.size()}")
            return torch.ops.batchnorm.batch_norm(
                input, self.weight, self.bias, self.running_mean, self.running_var, None,
                use_input_stats, momentum, self.eps, 1, 1)[0]
        return instance_norm(input, self.running_mean, self.running_var, self.weight,
                             self.bias, use_input_stats, momentum, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return self._apply_instance_norm(input)
        return super().forward(input)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """What torch's ``_InstanceNorm.forward`` does, for TorchScript, which has no
        ``super()``: its errors (not its warning about a channel count that an affine-free
        layer ignores), then input without a batch dim as a batch of one."""
        self._check_input_dim(input)
        channel_dim = input.dim() - self._get_no_batch_dim()
        if self.affine and input.size(channel_dim) != self.num_features:
            raise ValueError(f"expected input's size at dim={channel_dim} to match "
                             f"num_features ({self.num_features}), but got: "
                             f"{input.size(channel_dim)}.")
        if input.dim() == self._get_no_batch_dim():
            return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input)


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
