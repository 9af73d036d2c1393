"""Plain BatchNorm, GroupNorm and LayerNorm in traceable torch ops, for ``torch.compile``.

Under compilation the plain layers can decompose like torch.nn's own, so that Inductor
fuses them with their neighbours (a convolution's epilogue, the activation, the residual
add) instead of calling an opaque operator; the variants (ghost batches, Batch
Renormalization, SyncBN) stay operators. Statistics are ``torch.var_mean`` (Inductor's
Welford reduction), accumulated in float32 for half inputs. The running statistics follow
only a finite batch, without a data-dependent branch: the update is ``torch.where``-gated
and ``torch._assert_async`` raises ``RuntimeError`` for a NaN or infinite batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.kernels.reference import accumulation_dtype, activation_forward

NON_FINITE = ("input contains NaN or infinity: batch statistics are not finite, so the "
              "running statistics were left unchanged")


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]
            ) -> Tensor:
    if weight is not None:
        x_hat = x_hat * weight.reshape(shape)
    return x_hat if bias is None else x_hat + bias.reshape(shape)


def batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None,
               num_batches_tracked: Tensor | None, training: bool, momentum: float | None,
               eps: float, axis: int, activation: str, activation_param: float) -> Tensor:
    """BatchNorm of channel ``axis`` with an optional activation (one chunk, no renorm)."""
    x = input.to(accumulation_dtype(input.dtype))
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    if training:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        if running_mean is not None:
            _update(running_mean, running_var, num_batches_tracked, mean.reshape(-1),
                    var.reshape(-1), x.numel() // x.shape[axis], momentum)
    else:
        mean = running_mean.to(x.dtype).reshape(shape)
        var = running_var.to(x.dtype).reshape(shape)
    y = _affine((x - mean) * torch.rsqrt(var + eps), weight, bias, shape)
    return activation_forward(y, activation, activation_param).to(input.dtype)


@torch.no_grad()
def _update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
            mean: Tensor, var: Tensor, count: int, momentum: float | None) -> None:
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    torch._assert_async(finite, NON_FINITE)
    if momentum is not None:
        factor: float | Tensor = momentum
    elif num_batches_tracked is not None:
        factor = 1.0 / (num_batches_tracked + 1).to(mean.dtype)
    else:
        factor = 0.0
    for running, batch in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
        updated = torch.lerp(running.to(batch.dtype), batch, factor)
        running.copy_(torch.where(finite, updated, running.to(batch.dtype)))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    x = input.to(accumulation_dtype(input.dtype))
    grouped = x.reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(grouped, 2, correction=0, keepdim=True)
    x_hat = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    return _affine(x_hat, weight, bias, shape).to(input.dtype)


def layer_norm(input: Tensor, normalized_ndim: int, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    x = input.to(accumulation_dtype(input.dtype))
    dims = list(range(x.dim() - normalized_ndim, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    shape = list(x.shape[x.dim() - normalized_ndim:])
    return _affine(y, weight, bias, shape).to(input.dtype)
