"""The normalize step as a torch.autograd.Function with the analytic backward.

Forward:  x_hat = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps),  y = act(x_hat * w + b)
Backward: g = dy * act'(x_hat * w + b),  gh = g * w
          dw = sum_P(g * x_hat),   db = sum_P(g)
          dx = invstd * (gh - mean_R(gh) - x_hat * mean_R(gh * x_hat))   batch statistics
          dx = invstd * gh                                              given statistics
where R are the reduced dims (across processes when a reducer is given) and P the dims
the parameters broadcast over. Double backward recomputes the statistics from x with
differentiable torch ops and differentiates the same formula.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core.spec import NormSpec
from batchnorm.kernels import reference


class GradientReducer(Protocol):
    """Sums the backward's per-channel partial sums over every participant of the batch."""

    def sum_(self, *tensors: Tensor) -> None: ...


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, spec, batch_stats, count, reducer):
        if mean is None:  # batch statistics, computed by a fusing backend
            y, mean, invstd = kernels.fused(x, spec).forward_batch(x, weight, bias, spec)
        else:
            invstd = torch.rsqrt(var + spec.eps)
            y = kernels.select(x, spec).normalize(x, mean, invstd, weight, bias,
                                                  spec.activation)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.spec, ctx.batch_stats, ctx.count, ctx.reducer = spec, batch_stats, count, reducer
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        spec = ctx.spec
        if torch.is_grad_enabled():  # create_graph: stay differentiable
            backend = reference
            if ctx.batch_stats:
                mean, var = reference.moments(x, spec.reduce_dims)
                invstd = torch.rsqrt(var + spec.eps)
        else:
            backend = kernels.select(x, spec)
            fused = kernels.fused(x, spec) if ctx.batch_stats and ctx.reducer is None else None
            if fused is not None:
                grad_input, grad_weight, grad_bias = fused.backward_batch(
                    dy, x, mean, invstd, weight, bias, spec)
                return (grad_input if ctx.needs_input_grad[0] else None, None, None,
                        grad_weight, grad_bias, None, None, None, None)
        grad_weight, grad_bias, m1, m2 = backend.backward_reduce(
            dy, x, mean, invstd, weight, bias, spec)
        if not ctx.needs_input_grad[0]:
            return None, None, None, grad_weight, grad_bias, None, None, None, None
        if ctx.batch_stats:
            if ctx.reducer is not None:
                ctx.reducer.sum_(m1, m2)
            m1, m2 = m1 / ctx.count, m2 / ctx.count
        else:
            m1 = m2 = None
        grad_input = backend.backward_input(dy, x, mean, invstd, weight, bias, spec, m1, m2)
        return grad_input, None, None, grad_weight, grad_bias, None, None, None, None


def normalize(x: Tensor, mean: Tensor | None, var: Tensor | None, weight: Tensor | None,
              bias: Tensor | None, spec: NormSpec, *, batch_stats: bool, count: float = 0.0,
              reducer: GradientReducer | None = None) -> Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` on a canonical view.

    ``batch_stats`` says that mean and var are x's own statistics over ``spec.reduce_dims``
    (``count`` values per group, summed across processes by ``reducer``), so the backward
    differentiates through them; otherwise they are constants (running statistics).
    ``weight`` and ``bias`` are already viewed with ``spec.param_shape``. ``mean=None``
    (with ``var=None``) asks the fusing backend (:func:`batchnorm.kernels.fused`) to compute
    x's own statistics while it normalizes.
    """
    if mean is None:
        return _Normalize.apply(x, None, None, weight, bias, spec, True, float(count), None)
    return _Normalize.apply(x, mean.detach(), var.detach(), weight, bias, spec, batch_stats,
                            float(count), reducer)
