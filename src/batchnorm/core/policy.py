"""Where the statistics come from and how the running buffers follow them: the batch's
own (per chunk: ghost batches, instances), corrected toward reference statistics (Batch
Renormalization), or the running buffers; rejected when not finite, before anything
changes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

RENORM_KEYS = ("rmax", "rmin", "dmax")


def _overflow_message(what: str, dtype: torch.dtype) -> str:
    limit = torch.finfo(dtype).max ** 0.5
    return (f"the {what} overflows {dtype}: the input is finite but spreads over more than "
            f"~{limit:.1e} around its mean; normalize such data in float64 (e.g. "
            "layer.double() and x.double())")


def check_finite(mean: Tensor, var: Tensor) -> None:
    """A batch with NaN or infinity is rejected before it touches any buffer; a finite
    batch whose variance overflows says so."""
    if bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
        return
    if bool(torch.isfinite(mean).all() & ~torch.isnan(var).any()):
        raise ValueError(_overflow_message("batch variance", var.dtype) + "; the running "
                         "statistics were left unchanged")
    raise ValueError("input contains NaN or infinity: batch statistics are not finite, "
                     "so the running statistics were left unchanged")


def check_variance(invstd: Tensor) -> None:
    """``1 / sqrt(var + eps)`` is 0 only where the variance overflowed (NaN input gives
    NaN, which propagates to the output as in torch)."""
    if bool((invstd == 0).any()):
        raise ValueError(_overflow_message("variance", invstd.dtype))


def renorm_correction(mean: Tensor, var: Tensor, reference_mean: Tensor,
                      reference_var: Tensor, eps: float, clipping: Sequence[float]
                      ) -> tuple[Tensor, Tensor]:
    """Batch Renormalization (Ioffe, 2017, arXiv:1702.03275): with ``sigma = sqrt(var_R +
    eps)`` of the reference statistics before this step's update,

        r = clip(sqrt(var_B + eps) / sigma, rmin, rmax)
        d = clip((mean_B - mean_R) / sigma, -dmax, dmax)

    ``clipping`` is ``(rmax, rmin, dmax)``. r and d carry no gradient; the training output
    is ``gamma * (x_hat * r + d) + beta``."""
    rmax, rmin, dmax = clipping
    sigma = torch.sqrt(reference_var.to(var.dtype).view(1, -1) + eps)
    r = (torch.sqrt(var + eps) / sigma).clamp(rmin, rmax)
    d = ((mean - reference_mean.to(mean.dtype).view(1, -1)) / sigma).clamp(-dmax, dmax)
    return r, d


def pooled_statistics(mean: Tensor, var: Tensor, count: int, last_count: int
                      ) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of chunk statistics ``(A, C)``, each chunk of
    ``count`` values except the last, of ``last_count``:
    ``sum(n_a * mean_a) / sum(n_a)`` and ``sum(n_a * var_a) / (sum(n_a) - A)``, so one chunk
    gives the batch's unbiased variance and equal chunks the mean of their unbiased ones."""
    chunks = mean.shape[0]
    if chunks == 1:
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
        return mean[0], var[0] * (count / (count - 1))
    counts = torch.full((chunks, 1), float(count), dtype=mean.dtype, device=mean.device)
    counts[-1] = last_count
    total = counts.sum()
    return (counts * mean).sum(0) / total, (counts * var).sum(0) / (total - chunks)


def momentum_factor(num_batches_tracked: Tensor | None, momentum: float | None,
                    dtype: torch.dtype) -> float | Tensor:
    """This step's weight of the batch: ``momentum``, or ``1 / num_batches_tracked`` after
    counting this batch (a cumulative average) when ``momentum`` is None, as torch's."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is not None:
        return 1.0 / (num_batches_tracked + 1).to(dtype)
    return 0.0


def statistics_counts(shape: Sequence[int], axis: int, chunk: int) -> tuple[int, int]:
    """Values behind each row of a chunk statistics table: ``count`` for every chunk of
    ``chunk`` samples (dim 0; 0: the whole batch), ``last_count`` for the last one."""
    batch = shape[0]
    values = math.prod(shape) // max(shape[axis], 1)
    if not chunk or not batch:
        return values, values
    return values // batch * min(chunk, batch), values // batch * (batch % chunk or chunk)


def follow_batch(shape: Sequence[int], axis: int, chunk: int, mean: Tensor, var: Tensor,
                 running_mean: Tensor, running_var: Tensor,
                 num_batches_tracked: Tensor | None, momentum: float | None,
                 renorm_mean: Tensor | None, renorm_var: Tensor | None,
                 renorm_momentum: float) -> None:
    """The running statistics, and Batch Renormalization's own references when given,
    follow an accepted training batch of ``shape`` from its chunk statistics."""
    count, last_count = statistics_counts(shape, axis, chunk)
    update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         last_count, momentum)
    if renorm_mean is not None:
        update_running_stats(renorm_mean, renorm_var, None, mean, var, count, last_count,
                             renorm_momentum)


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor | None, mean: Tensor, var: Tensor,
                         count: int, last_count: int, momentum: float | None) -> None:
    """``running = (1 - f) * running + f * batch`` with the pooled unbiased variance;
    ``f = momentum``, or ``1 / num_batches_tracked`` after counting this batch when
    ``momentum`` is None (a cumulative average). An empty batch only counts. Values that
    are not finite, or that the buffers' dtype cannot hold, raise before anything changes.
    One host synchronization: the new values are finite only if the batch's are."""
    if mean.numel() == 0 or count == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    batch_mean, batch_var = pooled_statistics(mean, var, count, last_count)
    factor = momentum_factor(num_batches_tracked, momentum, batch_mean.dtype)
    updates = [(name, running, torch.lerp(running.to(batch.dtype), batch, factor))
               for name, running, batch in (("running_mean", running_mean, batch_mean),
                                            ("running_var", running_var, batch_var))]
    stored = [updated.to(running.dtype) for _, running, updated in updates]
    if not bool(torch.isfinite(stored[0]).all() & torch.isfinite(stored[1]).all()):
        check_finite(batch_mean, batch_var)
        name, running, updated = next(
            update for update, values in zip(updates, stored, strict=True)
            if not bool(torch.isfinite(values).all()))
        raise ValueError(f"{name} overflows its {running.dtype} buffer (new values up to "
                         f"{updated.abs().max().item():.4g}); keep the layer's buffers in "
                         "float32, e.g. with torch.autocast instead of .half()")
    for (_, running, _), values in zip(updates, stored, strict=True):
        running.copy_(values)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
