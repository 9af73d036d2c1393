"""Plain BatchNorm, GroupNorm and LayerNorm on torch's own ATen kernels, where
``BATCHNORM_BACKEND=aten`` (or ``kernels.use_backend("aten")``) asks for them, on any
device: torch's kernels, with their accuracy. Not the default: on a GPU, under a mean offset
of 1e4, ATen's CUDA kernels miss the float64 bars our kernels meet (channels-last
BatchNorm, InstanceNorm and LayerNorm outputs by up to 12x, GroupNorm's weight gradient).

This goes to ``aten::native_batch_norm`` directly, never through ``aten::batch_norm``,
which may pick cuDNN. The operators' contract stays ours:
the forward returns the biased batch variance (from which the operator moves the running
statistics, only for a finite batch) and checks the statistics exactly as the composite
does. InstanceNorm is BatchNorm of the input viewed
as ``(1, N * C, L)``, as torch computes it. The variants (fused activation, residual, ghost
batches, Batch Renormalization), channels-last InstanceNorm and GroupNorm, and half
precision keep the device's kernel primitives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core import layout
from batchnorm.core.policy import check_finite, check_variance

_aten = torch.ops.aten
_DTYPES = (torch.float32, torch.float64)


def handles(input: Tensor, *tensors: Tensor | None, channels_last: bool = True) -> bool:
    """Whether this call goes to the ATen kernels: where :func:`batchnorm.kernels.native`
    sends plain layers, and where they compute exactly what the composite would: float32/
    float64 input whose parameters and statistics share its dtype, in memory the kernels
    return their results in (contiguous, or channels-last where ``channels_last`` allows)."""
    if not kernels.native() or input.dtype not in _DTYPES or input.numel() == 0:
        return False
    if any(t is not None and t.dtype != input.dtype for t in tensors):
        return False
    return input.is_contiguous() or (channels_last and layout.is_channels_last(input, 1))


def _like_input(grad_output: Tensor, input: Tensor) -> Tensor:
    """The gradient in its input's memory order, as the kernels expect."""
    if layout.is_channels_last(input, 1):
        format = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        return grad_output.contiguous(memory_format=format)
    return grad_output.contiguous()


def _instances(input: Tensor, *per_channel: Tensor | None) -> list[Tensor | None]:
    """InstanceNorm's view: contiguous ``(N, C, ...)`` input as ``(1, N * C, L)``, with each
    per-channel tensor repeated per sample."""
    n = input.shape[0]
    return [input.view(1, n * input.shape[1], -1),
            *(None if t is None else t.repeat(n) for t in per_channel)]


def batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, training: bool,
               eps: float, instances: bool = False
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, r, d)`` of plain BatchNorm over dim 1 (r and d empty), or with
    ``instances`` (in training) of InstanceNorm, statistics ``(N, C)``.

    ATen returns ``1 / sqrt(var + eps)``, from which a variance far below eps cannot be
    recovered; the unbiased variance comes instead from a momentum-1 update of zeroed
    statistics, ``var = unbiased * (n - 1) / n``."""
    if training and instances:
        y, mean, var, r, d = batch_norm(*_instances(input, weight, bias), None, None, True, eps)
        table = input.shape[:2]
        return y.view(input.shape), mean.view(table), var.view(table), r, d
    if training:
        mean = input.new_zeros(input.shape[1])
        var = torch.zeros_like(mean)
        y, save_mean, _ = _aten.native_batch_norm(input, weight, bias, mean, var, True, 1.0,
                                                  eps)
        count = input.numel() // input.shape[1]
        mean, var = save_mean.view(1, -1), var.mul_((count - 1) / count).view(1, -1)
        check_finite(mean, var)
    else:  # copies: an operator's outputs never alias its inputs
        y = _aten._native_batch_norm_legit_no_training(input, weight, bias, running_mean,
                                                       running_var, 0.0, eps)[0]
        mean, var = running_mean.view(1, -1).clone(), running_var.view(1, -1).clone()
    empty = mean.new_empty((0,))
    return y, mean, var, empty, torch.empty_like(empty)


def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Tensor | None,
                        mean: Tensor, var: Tensor, training: bool, eps: float,
                        output_mask: list[bool], instances: bool = False
                        ) -> tuple[Tensor | None, ...]:
    """Gradients of :func:`batch_norm` (None where not asked for)."""
    grad_output = _like_input(grad_output, input)
    if training and instances:
        view, repeated = _instances(input, weight)
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            grad_output.view(view.shape), view, repeated, mean, var, True, eps, output_mask)
        per_sample = (input.shape[0], -1)
        return (None if grad_input is None else grad_input.view(input.shape),
                *(None if g is None else g.view(per_sample).sum(0)
                  for g in (grad_weight, grad_bias)))
    if training:
        return _aten.native_batch_norm_backward(
            grad_output, input, weight, None, None, mean.view(-1),
            torch.rsqrt(var.view(-1) + eps), True, eps, output_mask)
    return _aten.native_batch_norm_backward(grad_output, input, weight, mean.view(-1),
                                            var.view(-1), None, None, False, eps, output_mask)


def _group_shape(input: Tensor) -> tuple[int, int, int]:
    n, channels = input.shape[0], input.shape[1]
    return n, channels, input.numel() // max(n * channels, 1)


def group_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean (N, G), invstd (N, G))``."""
    y, mean, invstd = _aten.native_group_norm(input, weight, bias, *_group_shape(input),
                                              num_groups, eps)
    check_variance(invstd)
    return y, mean, invstd


def group_norm_backward(grad_output: Tensor, input: Tensor, weight: Tensor | None,
                        mean: Tensor, invstd: Tensor, num_groups: int,
                        output_mask: list[bool]) -> tuple[Tensor | None, ...]:
    return _aten.native_group_norm_backward(grad_output.contiguous(), input, mean, invstd,
                                            weight, *_group_shape(input), num_groups,
                                            output_mask)


def _stat_shape(input: Tensor, normalized_ndim: int) -> list[int]:
    return [*input.shape[:input.dim() - normalized_ndim], *(1,) * normalized_ndim]


def layer_norm(input: Tensor, normalized_ndim: int, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean (R,), invstd (R,))``."""
    y, mean, invstd = _aten.native_layer_norm(input, input.shape[input.dim() - normalized_ndim:],
                                              weight, bias, eps)
    check_variance(invstd)
    return y, mean.view(-1), invstd.view(-1)


def layer_norm_backward(grad_output: Tensor, input: Tensor, normalized_ndim: int,
                        weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                        invstd: Tensor, output_mask: list[bool]) -> tuple[Tensor | None, ...]:
    shape = _stat_shape(input, normalized_ndim)
    return _aten.native_layer_norm_backward(
        grad_output.contiguous(), input, input.shape[input.dim() - normalized_ndim:],
        mean.view(shape), invstd.view(shape), weight, bias, output_mask)
