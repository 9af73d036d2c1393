"""The kernel primitives in plain torch ops: any device, any float dtype. The specification
the compiled kernels (C++ on CPU, Triton on CUDA) are tested against.

Two canonical views cover every normalization (see :mod:`batchnorm.core.layout`):

* channels ``x (P, C, Q)``: statistics per (chunk, channel), where chunk ``a`` is the rows
  ``[a * chunk, (a + 1) * chunk)`` of dim 0 (the last chunk may be shorter), reduced over
  those rows and over Q. BatchNorm is one chunk (``chunk >= P``); ghost batches and
  InstanceNorm are several. Per-(chunk, channel) tables have shape ``(A, C)``,
  ``A = ceil(P / chunk)``.
* rows ``x (R, K)``: LayerNorm, statistics per row, parameters per column.

With ``z = (x - mean) * scale + shift`` (per-(chunk, channel) tables),
``g = dy * act'(z)``::

    channel_stats(x, chunk)                         -> mean, var        (biased)
    channel_normalize(x, mean, scale, shift, ...)   -> act(z)
    channel_backward_reduce(dy, x, mean, scale, shift, ...) -> sum(g), sum(g * (x - mean))
    channel_backward_input(dy, x, mean, scale, shift, k1, k0, k2, ...)
                                                    -> g * k1 + k0 + (x - mean) * k2

The ``*_residual`` variants are the ResNet block tail, ``act(z + residual)`` with the
shortcut ``residual`` of x's shape: their ``g`` is ``dy * act'(z + residual)``, and
:func:`channel_backward_input_residual` also returns ``d residual = g``.

Tables and sums are in the accumulation dtype (float32 for half inputs, else the input's);
outputs are in the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _acc(t: Tensor) -> Tensor:
    return t.to(accumulation_dtype(t.dtype))


def activation_forward(z: Tensor, name: str, param: float) -> Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "relu6":
        return torch.nn.functional.relu6(z)
    if name == "leaky_relu":
        return torch.where(z > 0, z, z * param)
    if name == "elu":
        return torch.where(z > 0, z, torch.expm1(z) * param)
    if name == "silu":
        return z * torch.sigmoid(z)
    return z


def activation_grad(z: Tensor, name: str, param: float) -> Tensor:
    """d act / dz, from the pre-activation z (recomputed in backward, never saved)."""
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if name == "leaky_relu":
        return torch.ones_like(z).masked_fill_(z <= 0, param)
    if name == "elu":
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z) * param)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return torch.ones_like(z)


def chunks(rows: int, chunk: int) -> int:
    """Statistics groups along dim 0 of a channels view."""
    return max(1, math.ceil(rows / chunk)) if rows else 0


def chunk_counts(rows: int, chunk: int, quantity: int, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """Values behind each chunk's statistics: ``chunk * Q``, the last chunk's possibly fewer."""
    counts = torch.full((chunks(rows, chunk),), float(chunk * quantity), dtype=dtype,
                        device=device)
    if rows % chunk:
        counts[-1] = (rows % chunk) * quantity
    return counts


def _per_row(table: Tensor, rows: int, chunk: int) -> Tensor:
    """An (A, C) table expanded to one row per row of a (P, C, Q) view: (P, C, 1)."""
    return table.repeat_interleave(chunk, dim=0)[:rows].unsqueeze(-1)


def _chunk_sums(values: Tensor, chunk: int) -> Tensor:
    """Sums of a (P, C, Q) tensor over each chunk's rows and Q: (A, C)."""
    rows = values.shape[0]
    whole = rows - rows % chunk
    parts = []
    if whole:
        parts.append(values[:whole].reshape(whole // chunk, chunk, *values.shape[1:]).sum((1, 3)))
    if whole < rows:
        parts.append(values[whole:].sum((0, 2)).unsqueeze(0))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def channel_stats(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Shifted two-pass mean and biased variance per (chunk, channel): subtracting one
    value per group first keeps a large common offset out of the sums, so float32 input
    with mean 1e4 and std 1 still gets its variance to ~1e-6 relative."""
    xa = _acc(x)
    rows, quantity = x.shape[0], x.shape[2]
    counts = chunk_counts(rows, chunk, quantity, xa.dtype, x.device).unsqueeze(1)
    pivot = xa[::chunk, :, 0]
    shifted = xa - _per_row(pivot, rows, chunk)
    shifted_mean = _chunk_sums(shifted, chunk) / counts
    centered = shifted - _per_row(shifted_mean, rows, chunk)
    var = _chunk_sums(centered.square(), chunk) / counts
    return pivot + shifted_mean, var


def _pre_activation(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, chunk: int
                    ) -> tuple[Tensor, Tensor]:
    rows = x.shape[0]
    centered = _acc(x) - _per_row(mean, rows, chunk)
    return centered, centered * _per_row(scale, rows, chunk) + _per_row(shift, rows, chunk)


def channel_normalize(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, chunk: int,
                      activation: str, param: float) -> Tensor:
    _, z = _pre_activation(x, mean, scale, shift, chunk)
    return activation_forward(z, activation, param).to(x.dtype)


def _gated(dy: Tensor, z: Tensor, activation: str, param: float) -> Tensor:
    g = _acc(dy)
    return g if activation == "identity" else g * activation_grad(z, activation, param)


def channel_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                            chunk: int, activation: str, param: float
                            ) -> tuple[Tensor, Tensor]:
    centered, z = _pre_activation(x, mean, scale, shift, chunk)
    g = _gated(dy, z, activation, param)
    return _chunk_sums(g, chunk), _chunk_sums(g * centered, chunk)


def channel_backward_input(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                           k1: Tensor, k0: Tensor, k2: Tensor, chunk: int, activation: str,
                           param: float) -> Tensor:
    rows = x.shape[0]
    centered, z = _pre_activation(x, mean, scale, shift, chunk)
    g = _gated(dy, z, activation, param)
    dx = (g * _per_row(k1, rows, chunk) + _per_row(k0, rows, chunk)
          + centered * _per_row(k2, rows, chunk))
    return dx.to(x.dtype)


def channel_normalize_residual(x: Tensor, residual: Tensor, mean: Tensor, scale: Tensor,
                               shift: Tensor, chunk: int, activation: str, param: float
                               ) -> Tensor:
    """``act(z + residual)``: normalize, add the shortcut and activate in one pass."""
    _, z = _pre_activation(x, mean, scale, shift, chunk)
    return activation_forward(z + _acc(residual), activation, param).to(x.dtype)


def channel_backward_reduce_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                     scale: Tensor, shift: Tensor, chunk: int, activation: str,
                                     param: float) -> tuple[Tensor, Tensor]:
    """sum(g), sum(g * (x - mean)) with ``g = dy * act'(z + residual)``."""
    centered, z = _pre_activation(x, mean, scale, shift, chunk)
    g = _gated(dy, z + _acc(residual), activation, param)
    return _chunk_sums(g, chunk), _chunk_sums(g * centered, chunk)


def channel_backward_input_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                    scale: Tensor, shift: Tensor, k1: Tensor, k0: Tensor,
                                    k2: Tensor, chunk: int, activation: str, param: float
                                    ) -> tuple[Tensor, Tensor]:
    """dx ``= g * k1 + k0 + (x - mean) * k2`` and ``d residual = g``, with
    ``g = dy * act'(z + residual)``."""
    rows = x.shape[0]
    centered, z = _pre_activation(x, mean, scale, shift, chunk)
    g = _gated(dy, z + _acc(residual), activation, param)
    dx = (g * _per_row(k1, rows, chunk) + _per_row(k0, rows, chunk)
          + centered * _per_row(k2, rows, chunk))
    return dx.to(x.dtype), g.to(residual.dtype, copy=True)  # never an alias of dy


def rows_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of each row of ``x (R, K)``: y, mean (R,), invstd (R,)."""
    mean, var = channel_stats(x.unsqueeze(1), 1)
    mean, invstd = mean.view(-1, 1), torch.rsqrt(var.view(-1, 1) + eps)
    y = (_acc(x) - mean) * invstd
    if weight is not None:
        y = y * _acc(weight)
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype), mean.view(-1), invstd.view(-1)


def rows_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """dx, and the column sums ``sum_r(dy * x_hat)``, ``sum_r(dy)`` (accumulation dtype),
    with ``dx = invstd * (gh - mean_k(gh) - x_hat * mean_k(gh * x_hat))``, ``gh = dy * w``."""
    g = _acc(dy)
    x_hat = (_acc(x) - mean.unsqueeze(1)) * invstd.unsqueeze(1)
    gh = g if weight is None else g * _acc(weight)
    dx = invstd.unsqueeze(1) * (gh - gh.mean(1, keepdim=True)
                                - x_hat * (gh * x_hat).mean(1, keepdim=True))
    return dx.to(x.dtype), (g * x_hat).sum(0), g.sum(0)
