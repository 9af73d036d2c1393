"""Where the statistics come from: the batch (optionally merged across processes, or split
into ghost batches), corrected toward the running statistics (Batch Renormalization), or
the running buffers; and how the running buffers follow the batch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core.autograd import GradientReducer, normalize
from batchnorm.core.layout import View, ghost_views
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


@dataclasses.dataclass(frozen=True, eq=False)
class Renorm:
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275) as a statistics policy.

    Training output ``gamma * (x_hat * r + d) + beta``, x_hat from the batch statistics, with

        r = clip(sqrt(var_B + eps) / sqrt(var + eps), rmin, rmax)
        d = clip((mean_B - mean) / sqrt(var + eps), -dmax, dmax)

    against ``mean``/``var`` (the running statistics when None, else buffers of their own
    that follow the batch with ``momentum``) as they were before this step's update.
    r and d carry no gradient; they fold into the affine step, ``weight' = weight * r``,
    ``bias' = bias + weight * d``, so the normalize kernels stay the same.
    """

    rmax: float = math.inf
    rmin: float = 0.0
    dmax: float = math.inf
    mean: Tensor | None = None
    var: Tensor | None = None
    momentum: float = 0.0

    @classmethod
    def from_clipping(cls, clipping: Mapping[str, float] | None, **fields: object) -> Renorm:
        """Validated limits from ``{"rmax":..., "rmin":..., "dmax":...}`` (any subset;
        missing ones do not clip, as in TensorFlow's ``renorm_clipping``)."""
        clipping = {} if clipping is None else clipping
        if not isinstance(clipping, Mapping):
            raise TypeError("renorm_clipping must be a mapping with keys among "
                            f"('rmax', 'rmin', 'dmax'), got {clipping!r}")
        unknown = sorted(set(clipping) - {"rmax", "rmin", "dmax"})
        if unknown:
            raise ValueError("renorm_clipping keys must be among ('rmax', 'rmin', 'dmax'), "
                             f"got {unknown}")
        limits = {key: float(value) for key, value in clipping.items()}
        renorm = cls(**limits, **fields)
        if not (0.0 <= renorm.rmin <= 1.0 <= renorm.rmax):
            raise ValueError("renorm_clipping must have 0 <= rmin <= 1 <= rmax, got "
                             f"rmin={renorm.rmin}, rmax={renorm.rmax}")
        if not renorm.dmax >= 0.0:
            raise ValueError(f"renorm_clipping dmax must be >= 0, got {renorm.dmax}")
        return renorm

    @torch.no_grad()
    def correction(self, batch_mean: Tensor, batch_var: Tensor, mean: Tensor, var: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
        """r and d for batch statistics against ``mean``/``var`` (float32 or wider)."""
        sigma = torch.sqrt(var + eps)
        r = (torch.sqrt(batch_var + eps) / sigma).clamp(self.rmin, self.rmax)
        d = ((batch_mean - mean) / sigma).clamp(-self.dmax, self.dmax)
        return r, d


@torch.no_grad()
def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                         var: Tensor, count: int | Sequence[int], momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance.

    Statistics of several groups per channel (ghost batches, instances) of ``count`` values
    each are averaged first: the mean of the group means and the mean of their unbiased
    variances. Groups of different sizes (``count`` per group) are pooled:
    ``sum(n_g * mean_g) / sum(n_g)`` and ``sum(n_g * var_g) / sum(n_g - 1)``.
    Non-finite statistics, or values a float16 buffer cannot hold, raise instead of
    poisoning the buffers."""
    channels = (running_mean if running_mean is not None else running_var).numel()
    mean, var = mean.reshape(-1, channels), var.reshape(-1, channels)
    if isinstance(count, int):
        mean, var = mean.mean(0), var.mean(0) * (count / (count - 1))
    else:
        counts = torch.tensor(count, dtype=mean.dtype, device=mean.device).unsqueeze(1)
        total = counts.sum()
        mean = (counts * mean).sum(0) / total
        var = (counts * var).sum(0) / (total - len(count))
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError("input contains NaN or infinity: batch statistics are not finite, "
                         "so the running statistics were left unchanged")
    updates = [(name, running, torch.lerp(running.to(batch.dtype), batch, momentum))
               for name, running, batch in (("running_mean", running_mean, mean),
                                            ("running_var", running_var, var))
               if running is not None]
    for name, running, updated in updates:
        if not torch.isfinite(updated.to(running.dtype)).all():
            raise ValueError(f"{name} overflows its {running.dtype} buffer (new values up to "
                             f"{updated.abs().max().item():.4g}); keep the layer's buffers in "
                             "float32, e.g. with torch.autocast instead of .half()")
    for _, running, updated in updates:
        running.copy_(updated)


def _as_stat(running: Tensor, spec: NormSpec) -> Tensor:
    dtype = kernels.reference.accumulation_dtype(running.dtype)
    return running.reshape(spec.param_shape).to(dtype)


def _renormalized_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """``gamma * (x_hat * r + d) + beta`` as ``x_hat * weight' + bias'``; differentiable in
    weight and bias, so that dgamma = sum(dy * (x_hat * r + d)) and dx sees weight * r."""
    if weight is None:
        return r, d if bias is None else bias + d
    return weight * r, weight * d if bias is None else bias + weight * d


def _normalize_batch(views: tuple[View, ...], spec: NormSpec, weight: Tensor | None,
                     bias: Tensor | None, running_mean: Tensor | None,
                     running_var: Tensor | None, momentum: float,
                     reducer: StatsReducer | None, renorm: Renorm | None) -> list[Tensor]:
    """Normalize each view with its own batch statistics (one view, or the ghost chunks);
    the running statistics follow all of them at once, after renorm has measured r and d."""
    spec = dataclasses.replace(spec, reduce_dims=views[0].reduce_dims,
                               param_shape=views[0].param_shape)
    if weight is not None:
        weight = weight.reshape(spec.param_shape)
    if bias is not None:
        bias = bias.reshape(spec.param_shape)
    if (len(views) == 1 and reducer is None and renorm is None and running_mean is None
            and running_var is None and kernels.fused(views[0].x, spec) is not None):
        return [normalize(views[0].x, None, None, weight, bias, spec, batch_stats=True,
                          count=views[0].count)]
    stats = [batch_moments(view, spec, reducer) for view in views]
    affine = [(weight, bias)] * len(views)
    if renorm is not None:
        reference_mean = _as_stat(renorm.mean if renorm.mean is not None else running_mean,
                                  spec)
        reference_var = _as_stat(renorm.var if renorm.var is not None else running_var, spec)
        affine = [_renormalized_affine(weight, bias, *renorm.correction(
            mean, var, reference_mean, reference_var, spec.eps)) for mean, var, _ in stats]
    counts = [count for _, _, count in stats]
    if min(counts) > 1:
        mean = torch.cat([mean.reshape(-1) for mean, _, _ in stats])
        var = torch.cat([var.reshape(-1) for _, var, _ in stats])
        group_counts = counts[0] if len(views) == 1 else \
            [count for view, count in zip(views, counts, strict=True)
             for _ in range(view.x.shape[0])]
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, group_counts, momentum)
        if renorm is not None and renorm.mean is not None:
            update_running_stats(renorm.mean, renorm.var, mean, var, group_counts,
                                 renorm.momentum)
    return [normalize(view.x, mean, var, w, b,
                      spec if w is None else dataclasses.replace(spec, param_shape=w.shape),
                      batch_stats=True, count=count, reducer=reducer)
            for view, (mean, var, count), (w, b) in zip(views, stats, affine, strict=True)]


def normalize_view(view: View, spec: NormSpec, weight: Tensor | None, bias: Tensor | None, *,
                   use_batch_stats: bool, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, momentum: float = 0.1,
                   reducer: StatsReducer | None = None, ghost_rows: int | None = None,
                   renorm: Renorm | None = None) -> Tensor:
    """stats -> policy -> normalize -> affine/activation, on a canonical view.

    With batch statistics, ``ghost_rows`` splits the view's leading dim into ghost batches
    of that many rows (per process: the reducer then plays no part) and ``renorm`` applies
    Batch Renormalization."""
    if ghost_rows is not None:
        reducer = None
    if use_batch_stats and (view.x.numel() > 0 or reducer is not None):
        if ghost_rows is None:
            return view.restore(_normalize_batch((view,), spec, weight, bias, running_mean,
                                                 running_var, momentum, reducer, renorm)[0])
        chunks = ghost_views(view, ghost_rows)
        ys = _normalize_batch(chunks, spec, weight, bias, running_mean, running_var, momentum,
                              None, renorm)
        parts = [chunk.restore(y) for chunk, y in zip(chunks, ys, strict=True)]
        return view.restore(torch.cat(parts) if len(parts) > 1 else parts[0])
    if weight is not None:
        weight = weight.reshape(spec.param_shape)
    if bias is not None:
        bias = bias.reshape(spec.param_shape)
    if view.x.numel() == 0:
        dtype = kernels.reference.accumulation_dtype(view.x.dtype)
        mean = view.x.new_zeros(spec.param_shape, dtype=dtype)
        var = mean + 1
    else:
        mean, var = (_as_stat(running, spec) for running in (running_mean, running_var))
    return view.restore(normalize(view.x, mean, var, weight, bias, spec, batch_stats=False))
