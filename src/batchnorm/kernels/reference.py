"""Pure-torch kernels: any device, any dtype, any view. Half precision accumulates in float32.

Every backend implements the same four functions on a view ``x`` with keepdim statistics:

    moments(x, dims)                      -> mean, var            (biased variance)
    normalize(x, mean, invstd, w, b, act) -> y = act((x - mean) * invstd * w + b)
    backward_reduce(dy, x, ...)           -> dw, db, s1, s2
    backward_input(dy, x, ..., m1, m2)    -> dx

with g = dy * act'(z), gh = g * w and x_hat = (x - mean) * invstd:

    dw = sum_P(g * x_hat),  db = sum_P(g)            P: dims a parameter broadcasts over
    s1 = sum_R(gh),         s2 = sum_R(gh * x_hat)   R: reduced dims
    dx = invstd * (gh - m1 - x_hat * m2)             m1 = s1 / n, m2 = s2 / n (0 in eval)
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.core.activation import Activation
from batchnorm.core.spec import NormSpec

name = "torch"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _acc(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(accumulation_dtype(t.dtype))


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Shifted two-pass mean and biased variance: subtracting one sample per group first
    keeps a large common offset out of the sums, so float32 input with mean 1e4 and
    std 1 still gets its variance to ~1e-6 relative."""
    xa = _acc(x)
    pivot = xa
    for d in dims:
        pivot = pivot.narrow(d, 0, 1)
    shifted = xa - pivot
    shifted_mean = shifted.mean(dims, keepdim=True)
    var = (shifted - shifted_mean).square().mean(dims, keepdim=True)
    return pivot + shifted_mean, var


def activation_forward(z: Tensor, act: Activation) -> Tensor:
    if act.name == "relu":
        return torch.relu(z)
    if act.name == "leaky_relu":
        return torch.where(z > 0, z, z * act.param)
    if act.name == "elu":
        return torch.where(z > 0, z, torch.expm1(z) * act.param)
    if act.name == "silu":
        return z * torch.sigmoid(z)
    return z


def activation_grad(z: Tensor, act: Activation) -> Tensor:
    """d act / dz, from the pre-activation z (recomputed in backward, never saved)."""
    if act.name == "relu":
        return (z > 0).to(z.dtype)
    if act.name == "leaky_relu":
        return torch.ones_like(z).masked_fill_(z <= 0, act.param)
    if act.name == "elu":
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z) * act.param)
    if act.name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise AssertionError(f"no gradient for {act.name}")


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    z = x_hat if weight is None else x_hat * _acc(weight)
    return z if bias is None else z + _acc(bias)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
              bias: Tensor | None, act: Activation) -> Tensor:
    z = _affine((_acc(x) - mean) * invstd, weight, bias)
    return activation_forward(z, act).to(x.dtype)


def _gated_grad(dy: Tensor, x_hat: Tensor, weight: Tensor | None, bias: Tensor | None,
                act: Activation) -> Tensor:
    g = _acc(dy)
    if not act.is_identity:
        g = g * activation_grad(_affine(x_hat, weight, bias), act)
    return g


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                    bias: Tensor | None, spec: NormSpec
                    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    x_hat = (_acc(x) - mean) * invstd
    g = _gated_grad(dy, x_hat, weight, bias, spec.activation)
    param_dims = spec.param_dims
    grad_weight = None if weight is None else (g * x_hat).sum(param_dims, keepdim=True)
    grad_bias = None if bias is None else g.sum(param_dims, keepdim=True)
    gh = g if weight is None else g * _acc(weight)
    s1 = gh.sum(spec.reduce_dims, keepdim=True)
    s2 = (gh * x_hat).sum(spec.reduce_dims, keepdim=True)
    return grad_weight, grad_bias, s1, s2


def backward_input(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                   bias: Tensor | None, spec: NormSpec, m1: Tensor | None,
                   m2: Tensor | None) -> Tensor:
    x_hat = (_acc(x) - mean) * invstd
    g = _gated_grad(dy, x_hat, weight, bias, spec.activation)
    gh = g if weight is None else g * _acc(weight)
    if m1 is not None:
        gh = gh - m1 - x_hat * m2
    return (gh * invstd).to(x.dtype)
