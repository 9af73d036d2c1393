"""The one computation behind every layer: stats -> policy -> normalize -> affine/activation,
written once over the kernel primitives of :mod:`batchnorm.kernels` (``prims``).

These functions are the implementations of the registered operators (:mod:`batchnorm.ops`)
wherever no compiled kernel takes the whole operator. With ``prims`` =
:mod:`batchnorm.kernels.reference` they are plain differentiable torch code: autograd then
differentiates through the statistics, which is how ``torch.func`` transforms and double
backward see them.

Backward, with ``z = x_hat * w' + b'`` the pre-activation (``w' = w * r``, ``b' = b + w * d``
under Batch Renormalization, else ``w``, ``b``), ``g = dy * act'(z)``, ``gh = g * w'``, n
values per statistics group::

    dw = sum(g * (x_hat * r + d)),   db = sum(g)
    dx = invstd * (gh - mean(gh) - x_hat * mean(gh * x_hat))      batch statistics
    dx = invstd * gh                                              given statistics
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

from batchnorm.core import layout
from batchnorm.core.policy import check_finite, check_variance, renorm_correction
from batchnorm.kernels.reference import accumulation_dtype, chunk_counts

_EMPTY_SHAPE = (0,)


class GradientReducer(Protocol):
    """Sums the backward's per-channel partial sums over every participant of the batch."""

    def sum_(self, *tensors: Tensor) -> None: ...


def _table(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).view(1, -1)


def _zero_grad(param: Tensor | None, needed: bool) -> Tensor | None:
    return torch.zeros_like(param) if needed and param is not None else None


def _rows_chunk(rows: int, per_sample: int, training: bool, chunk: int) -> int:
    if not training or chunk == 0:
        return max(rows, 1)
    return max(per_sample * chunk, 1)


def batch_norm_forward(prims: ModuleType, input: Tensor, weight: Tensor | None,
                       bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, training: bool, eps: float, axis: int,
                       chunk: int, activation: str, activation_param: float,
                       renorm_clipping: list[float] | None, renorm_mean: Tensor | None,
                       renorm_var: Tensor | None, check: bool = True,
                       renorm_rd: tuple[Tensor, Tensor] | None = None,
                       stats: tuple[Tensor, Tensor] | None = None,
                       residual: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BatchNorm (``chunk`` = 0), ghost batches (``chunk`` samples per statistics group)
    and InstanceNorm (``chunk`` = 1) of channel ``axis``: ``(y, mean, var, r, d)``; with
    ``residual`` (input's shape) ``y = act(z + residual)``, the ResNet block's tail.

    In training the statistics are the input's, per chunk ``(A, C)``, and ``renorm_clipping``
    ``(rmax, rmin, dmax)`` turns on Batch Renormalization against ``renorm_mean``/``var`` or
    else the running statistics (``renorm_rd`` replays saved r and d). Otherwise they are
    the running statistics, ``(1, C)``. r and d are empty without renorm."""
    channels_last = layout.is_channels_last(input, axis)
    x = layout.channel_view(input, axis, channels_last)
    rows = x.shape[0]
    acc = accumulation_dtype(input.dtype)
    rows_chunk = _rows_chunk(rows, layout.rows_per_sample(input, axis, channels_last),
                             training, chunk)
    if training and stats is not None:
        mean, var = stats
    elif training and x.numel() > 0:
        mean, var = prims.channel_stats(x, rows_chunk)
        if check:
            check_finite(mean, var)
    elif training:
        mean = x.new_zeros((1, x.shape[1]), dtype=acc)
        var = torch.ones_like(mean)
    else:  # copies: an operator's outputs never alias its inputs
        mean, var = _table(running_mean, acc).clone(), _table(running_var, acc).clone()
    invstd = torch.rsqrt(var + eps)
    w, b = _table(weight, acc), _table(bias, acc)
    scale = invstd if w is None else invstd * w
    shift = torch.zeros_like(mean) if b is None else b.expand_as(mean)
    r, d = mean.new_empty(_EMPTY_SHAPE), mean.new_empty(_EMPTY_SHAPE)  # outputs never alias
    if training and (renorm_clipping is not None or renorm_rd is not None):
        if renorm_rd is None:
            reference_mean = renorm_mean if renorm_mean is not None else running_mean
            reference_var = renorm_var if renorm_var is not None else running_var
            r, d = renorm_correction(mean.detach(), var.detach(), reference_mean,
                                     reference_var, eps, renorm_clipping)
        else:
            r, d = renorm_rd
        scale = scale * r
        shift = shift + (d if w is None else w * d)
    if x.numel() == 0:  # nothing to normalize; the kernels need no empty special case
        y = torch.empty_like(x)
    elif residual is None:
        y = prims.channel_normalize(x, mean, scale, shift, rows_chunk, activation,
                                    activation_param)
    else:
        y = prims.channel_normalize_residual(
            x, layout.channel_view(residual, axis, channels_last), mean, scale, shift,
            rows_chunk, activation, activation_param)
    return layout.restore(y, input, axis, channels_last), mean, var, r, d


def batch_norm_backward(prims: ModuleType, grad_output: Tensor, input: Tensor,
                        weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                        r: Tensor, d: Tensor, training: bool, eps: float, axis: int,
                        chunk: int, activation: str, activation_param: float,
                        output_mask: list[bool], reducer: GradientReducer | None = None,
                        count: int = 0, residual: Tensor | None = None
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`batch_norm_forward` with respect to input, weight, bias and
    residual (None where ``output_mask``, of 3 entries, or 4 with ``residual``, says they
    are not needed). With ``reducer``, the statistics were those of ``count`` values across
    processes: the input gradient's two sums are summed over the same processes (the
    parameter gradients stay local, as DDP expects)."""
    channels_last = layout.is_channels_last(input, axis)
    x = layout.channel_view(input, axis, channels_last)
    dy = layout.channel_view(grad_output, axis, channels_last)
    res = None if residual is None else layout.channel_view(residual, axis, channels_last)
    rows, _, quantity = x.shape
    acc = mean.dtype
    rows_chunk = _rows_chunk(rows, layout.rows_per_sample(input, axis, channels_last),
                             training, chunk)
    needs_residual = res is not None and output_mask[3]
    if x.numel() == 0 and reducer is None:
        return (torch.zeros_like(input) if output_mask[0] else None,
                _zero_grad(weight, output_mask[1]), _zero_grad(bias, output_mask[2]),
                torch.zeros_like(residual) if needs_residual else None)
    invstd = torch.rsqrt(var + eps)
    w, b = _table(weight, acc), _table(bias, acc)
    effective_w = torch.ones_like(mean) if w is None else w.expand_as(mean)
    shift = torch.zeros_like(mean) if b is None else b.expand_as(mean)
    renorm = r.numel() > 0
    if renorm:
        shift = shift + effective_w * d
        effective_w = effective_w * r
    scale = invstd * effective_w
    if x.numel() == 0:  # a process with no samples still takes part in the reduction
        sum_g = sum_gxc = torch.zeros_like(mean)
    elif res is None:
        sum_g, sum_gxc = prims.channel_backward_reduce(dy, x, mean, scale, shift, rows_chunk,
                                                       activation, activation_param)
    else:
        sum_g, sum_gxc = prims.channel_backward_reduce_residual(
            dy, x, res, mean, scale, shift, rows_chunk, activation, activation_param)
    sum_g_xhat = sum_gxc * invstd
    grad_weight = grad_bias = grad_input = grad_residual = None
    if output_mask[1] and weight is not None:
        grad_weight = (sum_g_xhat * r + sum_g * d if renorm else sum_g_xhat).sum(0)
        grad_weight = grad_weight.to(weight.dtype)
    if output_mask[2] and bias is not None:
        grad_bias = sum_g.sum(0).to(bias.dtype)
    if output_mask[0] or needs_residual:
        if not training:
            k0 = k2 = torch.zeros_like(scale)
        else:
            if reducer is not None:
                reducer.sum_(sum_g, sum_g_xhat)
                counts: float | Tensor = float(count)
            else:
                counts = chunk_counts(rows, rows_chunk, quantity, acc, x.device).unsqueeze(1)
            k2 = -(sum_g_xhat * effective_w / counts) * invstd.square()
            k0 = -(sum_g * effective_w / counts) * invstd
        if x.numel() == 0:
            return (torch.zeros_like(input), grad_weight, grad_bias,
                    torch.zeros_like(residual) if needs_residual else None)
        if res is None:
            dx = prims.channel_backward_input(dy, x, mean, scale, shift, scale, k0, k2,
                                              rows_chunk, activation, activation_param)
        else:
            dx, d_res = prims.channel_backward_input_residual(
                dy, x, res, mean, scale, shift, scale, k0, k2, rows_chunk, activation,
                activation_param)
            if needs_residual:
                grad_residual = layout.restore(d_res, residual, axis, channels_last)
        if output_mask[0]:
            grad_input = layout.restore(dx, input, axis, channels_last)
    return grad_input, grad_weight, grad_bias, grad_residual


def _instance_view(input: Tensor) -> tuple[Tensor, int, bool]:
    """Per-(sample, channel) statistics of channel axis 1: the view and its chunk rows."""
    channels_last = layout.is_channels_last(input, 1)
    x = layout.channel_view(input, 1, channels_last)
    return x, max(layout.rows_per_sample(input, 1, channels_last), 1), channels_last


def _expand_groups(table: Tensor, channels: int) -> Tensor:
    """A per-(sample, group) table ``(N, G)`` as per-(sample, channel) ``(N, C)``."""
    return table.repeat_interleave(channels // table.shape[1], dim=1)


def group_norm_forward(prims: ModuleType, input: Tensor, weight: Tensor | None,
                       bias: Tensor | None, num_groups: int, eps: float, check: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm: per-(sample, channel) statistics merged over each group's channels (the
    mean of the means, the mean of the variances plus the variance of the means, exact for
    equal counts): ``(y, mean (N, G), invstd (N, G))``."""
    x, rows_chunk, channels_last = _instance_view(input)
    n, channels = input.shape[0], input.shape[1]
    acc = accumulation_dtype(input.dtype)
    if x.numel() == 0:
        mean = x.new_zeros((n, num_groups), dtype=acc)
        return torch.empty_like(input), mean, torch.ones_like(mean)
    channel_mean, channel_var = prims.channel_stats(x, rows_chunk)
    grouped_mean = channel_mean.double().view(n, num_groups, -1)
    group_mean = grouped_mean.mean(2)
    group_var = (channel_var.double().view(n, num_groups, -1).mean(2)
                 + (grouped_mean - group_mean.unsqueeze(2)).square().mean(2))
    mean, invstd = group_mean.to(acc), torch.rsqrt(group_var + eps).to(acc)
    if check:
        check_variance(invstd)
    w, b = _table(weight, acc), _table(bias, acc)
    scale = _expand_groups(invstd, channels)
    if w is not None:
        scale = scale * w
    shift = torch.zeros_like(scale) if b is None else b.expand_as(scale)
    y = prims.channel_normalize(x, _expand_groups(mean, channels), scale, shift, rows_chunk,
                                "identity", 0.0)
    return layout.restore(y, input, 1, channels_last), mean, invstd


def group_norm_backward(prims: ModuleType, grad_output: Tensor, input: Tensor,
                        weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                        invstd: Tensor, num_groups: int, output_mask: list[bool]
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`group_norm_forward`; per-channel sums are merged per group."""
    x, rows_chunk, channels_last = _instance_view(input)
    if x.numel() == 0:
        return (torch.zeros_like(input) if output_mask[0] else None,
                _zero_grad(weight, output_mask[1]), _zero_grad(bias, output_mask[2]))
    dy = layout.channel_view(grad_output, 1, channels_last)
    n, channels = input.shape[0], input.shape[1]
    acc = mean.dtype
    channel_mean, channel_invstd = (_expand_groups(t, channels) for t in (mean, invstd))
    w = _table(weight, acc)
    effective_w = torch.ones_like(channel_invstd) if w is None else w.expand_as(channel_invstd)
    scale = channel_invstd * effective_w
    shift = torch.zeros_like(scale)
    sum_g, sum_gxc = prims.channel_backward_reduce(dy, x, channel_mean, scale, shift,
                                                   rows_chunk, "identity", 0.0)
    sum_g_xhat = sum_gxc * channel_invstd
    grad_input = grad_weight = grad_bias = None
    if output_mask[1] and weight is not None:
        grad_weight = sum_g_xhat.sum(0).to(weight.dtype)
    if output_mask[2] and bias is not None:
        grad_bias = sum_g.sum(0).to(bias.dtype)
    if output_mask[0]:
        count = x.numel() // (n * num_groups)

        def group_mean(t: Tensor) -> Tensor:
            return _expand_groups((t * effective_w).view(n, num_groups, -1).sum(2) / count,
                                  channels)

        k0 = -group_mean(sum_g) * channel_invstd
        k2 = -group_mean(sum_g_xhat) * channel_invstd.square()
        grad_input = layout.restore(
            prims.channel_backward_input(dy, x, channel_mean, scale, shift, scale, k0, k2,
                                         rows_chunk, "identity", 0.0),
            input, 1, channels_last)
    return grad_input, grad_weight, grad_bias


def layer_norm_forward(prims: ModuleType, input: Tensor, normalized_ndim: int,
                       weight: Tensor | None, bias: Tensor | None, eps: float,
                       check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the trailing ``normalized_ndim`` dims: ``(y, mean (R,), invstd (R,))``."""
    x = layout.row_view(input, normalized_ndim)
    if x.numel() == 0:
        mean = x.new_zeros(x.shape[0], dtype=accumulation_dtype(x.dtype))
        return torch.empty_like(input), mean, torch.ones_like(mean)
    y, mean, invstd = prims.rows_forward(x, None if weight is None else weight.reshape(-1),
                                         None if bias is None else bias.reshape(-1), eps)
    if check:
        check_variance(invstd)
    return y.view(input.shape), mean, invstd


def layer_norm_backward(prims: ModuleType, grad_output: Tensor, input: Tensor,
                        normalized_ndim: int, weight: Tensor | None, bias: Tensor | None,
                        mean: Tensor, invstd: Tensor, output_mask: list[bool]
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`layer_norm_forward`."""
    x = layout.row_view(input, normalized_ndim)
    if x.numel() == 0:
        return (torch.zeros_like(input) if output_mask[0] else None,
                _zero_grad(weight, output_mask[1]), _zero_grad(bias, output_mask[2]))
    dy = layout.row_view(grad_output, normalized_ndim)
    dx, sum_g_xhat, sum_g = prims.rows_backward(
        dy, x, mean, invstd, None if weight is None else weight.reshape(-1))
    grad_weight = grad_bias = None
    if output_mask[1] and weight is not None:
        grad_weight = sum_g_xhat.view(weight.shape).to(weight.dtype)
    if output_mask[2] and bias is not None:
        grad_bias = sum_g.view(bias.shape).to(bias.dtype)
    return dx.view(input.shape) if output_mask[0] else None, grad_weight, grad_bias
