"""Plain BatchNorm in traceable torch ops, for ``torch.compile``.

Under compilation the plain layers can decompose like torch.nn's own, so that Inductor
fuses them with their neighbours (a convolution's epilogue, the activation, the residual
add) instead of calling an opaque operator; the variants (ghost batches, Batch
Renormalization, SyncBN) stay operators. (Plain GroupNorm and LayerNorm, with no buffers
to guard, are torch's own functionals under compilation.) BatchNorm over dim 1 uses the
ATen operators torch.nn's layers compile to, so both get the same graphs; other axes and
the cumulative average (``momentum=None``) use ``torch.var_mean`` (Inductor's Welford
reduction), accumulated in float32 for half inputs. The running statistics follow only a
finite batch, without a data-dependent branch: the update is ``torch.where``-gated and
``torch._assert_async`` raises ``RuntimeError`` for a NaN or infinite batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.core.policy import momentum_factor
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
               eps: float, axis: int, activation: str, activation_param: float,
               residual: Tensor | None = None) -> Tensor:
    """BatchNorm of channel ``axis`` with an optional residual and activation (one chunk,
    no renorm): ``act(BN(input) [+ residual])``."""
    if axis == 1 and (momentum is not None or running_mean is None or not training):
        y = _aten_batch_norm(input, weight, bias, running_mean, running_var,
                             num_batches_tracked, training, momentum, eps)
        if residual is not None:
            y = y + residual
        return activation_forward(y, activation, activation_param)
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
    if residual is not None:
        y = y + residual.to(y.dtype)
    return activation_forward(y, activation, activation_param).to(input.dtype)


def _aten_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     num_batches_tracked: Tensor | None, training: bool,
                     momentum: float | None, eps: float) -> Tensor:
    """The ATen operators torch.nn's BatchNorm compiles to, so that Inductor builds the
    same forward and backward graphs for both; the functional variant returns the new
    running statistics instead of writing them, and a non-finite batch leaves them as they
    were."""
    aten = torch.ops.aten
    if not training:
        return aten._native_batch_norm_legit_no_training(input, weight, bias, running_mean,
                                                         running_var, 0.0, eps)[0]
    if running_mean is None:
        return aten._native_batch_norm_legit.no_stats(input, weight, bias, True, 0.0, eps)[0]
    # copies: its backward saves them, and the buffers change below
    out, mean, _, new_mean, new_var = aten._native_batch_norm_legit_functional(
        input, weight, bias, running_mean.clone(), running_var.clone(), True, momentum, eps)
    finite = torch.isfinite(mean).all() & torch.isfinite(new_var).all()
    _write_if_finite(finite, running_mean, running_var, num_batches_tracked, new_mean, new_var)
    return out


@torch.no_grad()
def _update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
            mean: Tensor, var: Tensor, count: int, momentum: float | None) -> None:
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    factor = momentum_factor(num_batches_tracked, momentum, mean.dtype)
    new_mean, new_var = (torch.lerp(running.to(batch.dtype), batch, factor)
                         for running, batch in ((running_mean, mean),
                                                (running_var, var * (count / (count - 1)))))
    _write_if_finite(finite, running_mean, running_var, num_batches_tracked, new_mean, new_var)


@torch.no_grad()
def _write_if_finite(finite: Tensor, running_mean: Tensor, running_var: Tensor,
                     num_batches_tracked: Tensor | None, new_mean: Tensor, new_var: Tensor
                     ) -> None:
    """The new running statistics, and the batch's count, only for a finite batch; a
    non-finite one raises, without a data-dependent branch in the graph."""
    torch._assert_async(finite, NON_FINITE)
    for running, new in ((running_mean, new_mean), (running_var, new_var)):
        running.copy_(torch.where(finite, new, running.to(new.dtype)))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
