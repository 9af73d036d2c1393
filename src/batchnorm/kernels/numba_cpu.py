"""Numba CPU kernels for float32 canonical views, with the reference's four functions.

Each view is handed to the compiled loops of :mod:`batchnorm.kernels._numba_loops` in one
of these layouts, chosen from where the statistics and parameters vary:

* segments ``(S, L)``: the last dim is reduced and the parameters are constant along it
  (BatchNorm ``(P, C, Q)``, GroupNorm/InstanceNorm ``(N, G, Cg, L)``, LayerNorm without
  parameters); per-segment scalars are the keepdim statistics expanded over the leading
  dims, and the per-segment sums are folded into statistics by torch in float64;
* columns ``(M, C)``: BatchNorm channels-last, reduced over rows;
* rows ``(R, K)``: LayerNorm, statistics per row, parameters per column; these only run
  fused (below), since a LayerNorm always normalizes with its own statistics.

Where each statistics block is small and contiguous (a LayerNorm row, a GroupNorm or
InstanceNorm ``(sample, group)`` block of an ``(N, G, Cg, L)`` view), :func:`forward_batch`
and :func:`backward_batch` do the statistics and normalize, and the whole backward, in one
visit per block while it is in cache.

Anything else (other dtypes, devices or views) is not supported: :func:`supports` says so
and the dispatch uses the reference.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from batchnorm.core.activation import Activation
from batchnorm.core.spec import NormSpec
from batchnorm.kernels import _numba_loops as loops

name = "numba"

# Below this many elements the fixed cost of a parallel region and of the per-call
# conversions outweighs torch's (see docs/benchmarks.md); measured on 2 cores.
MIN_ELEMENTS = 1 << 16
# Columns narrower than this leave most of a vector register idle: torch is as fast there.
MIN_COLUMNS = 16


def _layout_of(x: Tensor, reduce_dims: tuple[int, ...], param_shape: tuple[int, ...]
               ) -> str | None:
    last = x.dim() - 1
    if last in reduce_dims and param_shape[-1] == 1:
        return "segments"
    if x.dim() == 2 and reduce_dims == (0,):
        return "columns"
    if x.dim() == 2 and reduce_dims == (1,):
        return "rows"
    return None


def supports(x: Tensor, spec: NormSpec) -> bool:
    """True for contiguous, non-empty float32 CPU views in one of the three layouts."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and x.is_contiguous()
            and _layout_of(x, spec.reduce_dims, spec.param_shape) is not None)


def prefers(x: Tensor, spec: NormSpec) -> bool:
    """The default dispatch rule: the kernels win once there are at least ``MIN_ELEMENTS``
    values, except on channels-last views narrower than ``MIN_COLUMNS`` channels and on
    segments shorter than ``MIN_COLUMNS`` values (both leave the vector units idle)."""
    if x.numel() < MIN_ELEMENTS:
        return False
    layout = _layout_of(x, spec.reduce_dims, spec.param_shape)
    if layout == "segments":
        return x.shape[-1] >= MIN_COLUMNS
    if layout == "columns":
        return x.shape[1] >= MIN_COLUMNS
    return True


def _fused_layout(x: Tensor, spec: NormSpec) -> str | None:
    """``rows`` (LayerNorm: statistics per row) or ``groups`` (GroupNorm/InstanceNorm: per
    sample and group of an (N, G, Cg, L) view): layouts whose statistics blocks are small
    and contiguous, so one visit per block does statistics and normalization."""
    if _layout_of(x, spec.reduce_dims, spec.param_shape) == "rows":
        return "rows"
    if x.dim() == 4 and spec.reduce_dims == (2, 3) and spec.param_shape == (1, *x.shape[1:3], 1):
        return "groups"
    return None


def fuses(x: Tensor, spec: NormSpec) -> bool:
    """True where :func:`forward_batch` and :func:`backward_batch` apply."""
    return _fused_layout(x, spec) is not None


def _group_params(t: Tensor | None, x: Tensor, fill: float) -> np.ndarray:
    if t is None:
        return np.full(x.shape[1:3], fill, np.float32)
    return _array(t.reshape(x.shape[1:3]))


def forward_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: NormSpec
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """y, mean and invstd (keepdim) of a view normalized with its own statistics, each
    statistics block read once from memory."""
    _use_torch_threads()
    code, param = _code(spec.activation)
    y = torch.empty_like(x)
    stat_shape = [1 if d in spec.reduce_dims else size for d, size in enumerate(x.shape)]
    mean = torch.empty(stat_shape, dtype=x.dtype)
    invstd = torch.empty_like(mean)
    if _fused_layout(x, spec) == "rows":
        loops.row_forward(x.detach().numpy(), _columns(weight, x, 1.0),
                          _columns(bias, x, 0.0), spec.eps, code, param, y.numpy(),
                          mean.numpy().reshape(-1), invstd.numpy().reshape(-1))
    else:
        loops.group_forward(x.detach().numpy(), _group_params(weight, x, 1.0),
                            _group_params(bias, x, 0.0), spec.eps, code, param, y.numpy(),
                            mean.numpy().reshape(x.shape[:2]),
                            invstd.numpy().reshape(x.shape[:2]))
    return y, mean, invstd


def backward_batch(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                   weight: Tensor | None, bias: Tensor | None, spec: NormSpec
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dx, dweight, dbias of a view normalized with its own statistics, each statistics
    block read once from memory."""
    _use_torch_threads()
    code, param = _code(spec.activation)
    dx = torch.empty_like(x)
    if _fused_layout(x, spec) == "rows":
        grad_weight = torch.zeros(1, x.shape[1], dtype=torch.float64)
        grad_bias = torch.zeros_like(grad_weight)
        loops.row_backward(_array(dy), x.detach().numpy(), _array(mean.reshape(-1)),
                           _array(invstd.reshape(-1)), _columns(weight, x, 1.0),
                           _columns(bias, x, 0.0), code, param,
                           grad_weight.numpy().reshape(-1), grad_bias.numpy().reshape(-1),
                           dx.numpy())
    else:
        sum_g = torch.empty(x.shape[:3], dtype=torch.float64)
        sum_g_xhat = torch.empty_like(sum_g)
        loops.group_backward(_array(dy), x.detach().numpy(),
                             _array(mean.reshape(x.shape[:2])),
                             _array(invstd.reshape(x.shape[:2])), _group_params(weight, x, 1.0),
                             _group_params(bias, x, 0.0), code, param, sum_g.numpy(),
                             sum_g_xhat.numpy(), dx.numpy())
        grad_weight = sum_g_xhat.sum(0).reshape(spec.param_shape)
        grad_bias = sum_g.sum(0).reshape(spec.param_shape)
    return (dx, None if weight is None else grad_weight.to(x.dtype),
            None if bias is None else grad_bias.to(x.dtype))


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _array(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _segments(t: Tensor | None, x: Tensor, fill: float) -> np.ndarray:
    """A keepdim tensor (constant along x's last dim) as one float32 value per segment."""
    if t is None:
        return np.full(math.prod(x.shape[:-1]), fill, np.float32)
    return _array(t.expand(*x.shape[:-1], 1).reshape(-1))


def _columns(t: Tensor | None, x: Tensor, fill: float) -> np.ndarray:
    if t is None:
        return np.full(x.shape[-1], fill, np.float32)
    return _array(t.reshape(-1))


def _call_layout(x: Tensor, stat: Tensor, weight: Tensor | None, bias: Tensor | None) -> str:
    """The layout of a call, from the shapes of its statistics and parameters."""
    if stat.shape[-1] == 1 and all(p is None or p.shape[-1] == 1 for p in (weight, bias)):
        return "segments"
    if stat.shape[-1] == x.shape[-1]:
        return "columns"
    raise ValueError("row statistics with per-column parameters (LayerNorm) run through "
                     "forward_batch and backward_batch")


def _per(layout: str, t: Tensor | None, x: Tensor, fill: float) -> np.ndarray:
    return _segments(t, x, fill) if layout == "segments" else _columns(t, x, fill)


def _scale(invstd: Tensor, weight: Tensor | None) -> Tensor:
    return invstd if weight is None else invstd * weight


def _code(act: Activation) -> tuple[int, np.float32]:
    """The loops' activation code and parameter; piecewise-linear ones pass their negative
    slope (identity 1, relu 0)."""
    code = loops.ACTIVATION_CODES[act.name]
    if code <= loops.PIECEWISE_LINEAR:
        return code, np.float32({"identity": 1.0, "relu": 0.0}.get(act.name, act.param))
    return code, np.float32(act.param)


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (keepdim), from float64 sums of x minus a
    pivot (the group's first value)."""
    _use_torch_threads()
    pivot = x.detach()
    for d in dims:
        pivot = pivot.narrow(d, 0, 1)
    xa = x.detach().numpy()
    if x.dim() - 1 in dims:
        seg_shape = (*x.shape[:-1], 1)
        sums = np.zeros(math.prod(x.shape[:-1]))
        sq_sums = np.zeros_like(sums)
        loops.segment_sums(xa.reshape(-1, x.shape[-1]), _segments(pivot, x, 0.0), sums,
                           sq_sums)
        total = torch.from_numpy(sums).view(seg_shape).sum(dims, keepdim=True)
        total_sq = torch.from_numpy(sq_sums).view(seg_shape).sum(dims, keepdim=True)
    else:
        total = torch.zeros(1, x.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        loops.column_sums(xa, _columns(pivot, x, 0.0), total.numpy().reshape(-1),
                          total_sq.numpy().reshape(-1))
    count = math.prod(x.shape[d] for d in dims)
    shifted_mean = total / count
    var = (total_sq / count - shifted_mean.square()).clamp_min(0.0)
    return (pivot.double() + shifted_mean).to(x.dtype), var.to(x.dtype)


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
              bias: Tensor | None, act: Activation) -> Tensor:
    """y = act((x - mean) * invstd * weight + bias)."""
    _use_torch_threads()
    y = torch.empty_like(x)
    code, param = _code(act)
    xa, ya = x.detach().numpy(), y.numpy()
    layout = _call_layout(x, mean, weight, bias)
    kernel = loops.segment_normalize if layout == "segments" else loops.column_normalize
    kernel(_rows_of(layout, xa), _per(layout, mean, x, 0.0),
           _per(layout, _scale(invstd, weight), x, 1.0), _per(layout, bias, x, 0.0), code,
           param, _rows_of(layout, ya))
    return y


def _rows_of(layout: str, a: np.ndarray) -> np.ndarray:
    """The 2-D array a layout's loops run on: ``(S, L)`` segments or ``(M, C)`` columns."""
    return a.reshape(-1, a.shape[-1])


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                    bias: Tensor | None, spec: NormSpec
                    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """dw, db, s1 = sum_R(g * w), s2 = sum_R(g * w * x_hat), with g = dy * act'(z); the
    loops return float64 sums of g and g * (x - mean) per segment or column."""
    _use_torch_threads()
    code, param = _code(spec.activation)
    xa, dya = x.detach().numpy(), _array(dy)
    layout = _call_layout(x, mean, weight, bias)
    stat_shape = (*x.shape[:-1], 1) if layout == "segments" else (1, x.shape[-1])
    sum_g = torch.zeros(stat_shape, dtype=torch.float64)
    sum_g_xc = torch.zeros_like(sum_g)
    kernel = (loops.segment_backward_sums if layout == "segments"
              else loops.column_backward_sums)
    kernel(_rows_of(layout, dya), _rows_of(layout, xa), _per(layout, mean, x, 0.0),
           _per(layout, _scale(invstd, weight), x, 1.0), _per(layout, bias, x, 0.0), code,
           param, sum_g.numpy().reshape(-1), sum_g_xc.numpy().reshape(-1))
    sum_g_xhat = sum_g_xc * invstd.double()
    grad_weight = sum_g_xhat.sum(spec.param_dims, keepdim=True)
    grad_bias = sum_g.sum(spec.param_dims, keepdim=True)
    w = 1.0 if weight is None else weight.double()
    s1 = (sum_g * w).sum(spec.reduce_dims, keepdim=True)
    s2 = (sum_g_xhat * w).sum(spec.reduce_dims, keepdim=True)
    return (None if weight is None else grad_weight.to(x.dtype),
            None if bias is None else grad_bias.to(x.dtype), s1.to(x.dtype), s2.to(x.dtype))


def backward_input(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                   bias: Tensor | None, spec: NormSpec, m1: Tensor | None,
                   m2: Tensor | None) -> Tensor:
    """dx = invstd * (g * w - m1 - x_hat * m2), computed as g * k1 + k0 + (x - mean) * k2
    with k1 = invstd * w, k0 = -m1 * invstd, k2 = -m2 * invstd^2 (m1 = m2 = 0 in eval)."""
    _use_torch_threads()
    code, param = _code(spec.activation)
    batch_stats = m1 is not None
    if not batch_stats:
        m1 = m2 = torch.zeros_like(invstd)
    dx = torch.empty_like(x)
    xa, dya, dxa = x.detach().numpy(), _array(dy), dx.numpy()
    layout = _call_layout(x, mean, weight, bias)
    k1 = _scale(invstd, weight)
    kernel = (loops.segment_backward_input if layout == "segments"
              else loops.column_backward_input)
    kernel(_rows_of(layout, dya), _rows_of(layout, xa), _per(layout, mean, x, 0.0),
           _per(layout, k1, x, 1.0), _per(layout, bias, x, 0.0), code, param,
           _per(layout, k1, x, 1.0), _per(layout, -m1 * invstd, x, 0.0),
           _per(layout, -m2 * invstd.square(), x, 0.0), batch_stats, _rows_of(layout, dxa))
    return dx
