"""Batch statistics of a batch spread over processes (SyncBatchNorm): the same core, with
the statistics merged by a reducer before normalizing and the input gradient's two sums
summed by it in the backward. One collective each way; the collectives themselves live
in :mod:`batchnorm.distributed`."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core import layout, normalize
from batchnorm.core.policy import check_finite, update_running_stats
from batchnorm.kernels.reference import accumulation_dtype


class StatsReducer(normalize.GradientReducer, Protocol):
    """Merges per-process statistics into those of the global batch."""

    def merge_moments(self, mean: Tensor, var: Tensor, count: int
                      ) -> tuple[Tensor, Tensor, int]: ...


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, axis, activation, activation_param, renorm_clipping,
                renorm_mean, renorm_var, renorm_momentum, reducer, residual):
        prims = kernels.primitives(input)
        channels_last = layout.is_channels_last(input, axis)
        x = layout.channel_view(input, axis, channels_last)
        count = x.numel() // max(x.shape[1], 1)
        if count:
            mean, var = prims.channel_stats(x, x.shape[0])
        else:
            mean = x.new_zeros((1, x.shape[1]), dtype=accumulation_dtype(x.dtype))
            var = torch.zeros_like(mean)
        mean, var, total = reducer.merge_moments(mean, var, count)
        check_finite(mean, var)
        out, mean, var, r, d = normalize.batch_norm_forward(
            prims, input, weight, bias, running_mean, running_var, True, eps, axis, 0,
            activation, activation_param, renorm_clipping, renorm_mean, renorm_var,
            stats=(mean, var), residual=residual)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                 total, total, momentum)
        if renorm_mean is not None:
            update_running_stats(renorm_mean, renorm_var, None, mean, var, total, total,
                                 renorm_momentum)
        ctx.save_for_backward(input, weight, bias, mean, var, r, d, residual)
        ctx.options = (eps, axis, activation, activation_param, reducer, total)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, var, r, d, residual = ctx.saved_tensors
        eps, axis, activation, activation_param, reducer, total = ctx.options
        needs = [*ctx.needs_input_grad[:3], ctx.needs_input_grad[16]]
        *grads, grad_residual = normalize.batch_norm_backward(
            kernels.primitives(input), grad_output, input, weight, bias, mean, var, r, d, True,
            eps, axis, 0, activation, activation_param, needs, reducer=reducer, count=total,
            residual=residual)
        return (*grads, *(None,) * 13, grad_residual)


def sync_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None,
                    num_batches_tracked: Tensor | None, momentum: float | None, eps: float,
                    axis: int, activation: str, activation_param: float,
                    renorm_clipping: list[float] | None, renorm_mean: Tensor | None,
                    renorm_var: Tensor | None, renorm_momentum: float,
                    reducer: StatsReducer, residual: Tensor | None = None) -> Tensor:
    """Training-mode batch norm with the statistics of the batch of every process that
    ``reducer`` reaches, ``act(BN(input) [+ residual])``; running statistics follow the
    global batch."""
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var,
                                num_batches_tracked, momentum, eps, axis, activation,
                                activation_param, renorm_clipping, renorm_mean, renorm_var,
                                renorm_momentum, reducer, residual)
