"""Where the statistics come from: the batch (optionally merged across processes) or the
running buffers, and how the running buffers follow the batch."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core.autograd import GradientReducer, normalize
from batchnorm.core.layout import View
from batchnorm.core.spec import NormSpec


class StatsReducer(GradientReducer, Protocol):
    """Merges per-process statistics into those of the global batch (SyncBatchNorm)."""

    def merge_moments(self, mean: Tensor, var: Tensor, count: int
                      ) -> tuple[Tensor, Tensor, int]: ...


@torch.no_grad()
def batch_moments(view: View, spec: NormSpec, reducer: StatsReducer | None = None
                  ) -> tuple[Tensor, Tensor, int]:
    """Mean, biased variance and the count behind them, over the view's reduced dims.

    A view with no values (a process whose share of a synchronized batch is empty) gives
    zeros with count 0, which the reducer's merge weighs by that count: nothing."""
    if view.count == 0:
        shape = [1 if d in spec.reduce_dims else size for d, size in enumerate(view.x.shape)]
        mean = var = view.x.new_zeros(shape, dtype=kernels.reference.accumulation_dtype(
            view.x.dtype))
    else:
        mean, var = kernels.select(view.x, spec).moments(view.x, spec.reduce_dims)
    count = view.count
    if reducer is not None:
        mean, var, count = reducer.merge_moments(mean, var, count)
    return mean, var, count


@torch.no_grad()
def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                         var: Tensor, count: int, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance.

    Statistics of several groups per channel (ghost batches, instances) are averaged
    first. Non-finite statistics raise instead of poisoning the buffers."""
    channels = (running_mean if running_mean is not None else running_var).numel()
    mean = mean.reshape(-1, channels).mean(0)
    var = var.reshape(-1, channels).mean(0) * (count / (count - 1))
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError("input contains NaN or infinity: batch statistics are not finite, "
                         "so the running statistics were left unchanged")
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_(var.to(running_var.dtype), momentum)


def _as_stat(running: Tensor, spec: NormSpec) -> Tensor:
    dtype = kernels.reference.accumulation_dtype(running.dtype)
    return running.reshape(spec.param_shape).to(dtype)


def normalize_view(view: View, spec: NormSpec, weight: Tensor | None, bias: Tensor | None, *,
                   use_batch_stats: bool, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, momentum: float = 0.1,
                   reducer: StatsReducer | None = None) -> Tensor:
    """stats -> policy -> normalize -> affine/activation, on a canonical view."""
    if weight is not None:
        weight = weight.reshape(spec.param_shape)
    if bias is not None:
        bias = bias.reshape(spec.param_shape)
    if view.x.numel() == 0 and reducer is None:
        dtype = kernels.reference.accumulation_dtype(view.x.dtype)
        zeros = view.x.new_zeros(spec.param_shape, dtype=dtype)
        return view.restore(normalize(view.x, zeros, zeros + 1, weight, bias, spec,
                                      batch_stats=False))
    if use_batch_stats:
        mean, var, count = batch_moments(view, spec, reducer)
        if count > 1 and (running_mean is not None or running_var is not None):
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        y = normalize(view.x, mean, var, weight, bias, spec, batch_stats=True, count=count,
                      reducer=reducer)
    else:
        mean, var = (_as_stat(running, spec) for running in (running_mean, running_var))
        y = normalize(view.x, mean, var, weight, bias, spec, batch_stats=False)
    return view.restore(y)
