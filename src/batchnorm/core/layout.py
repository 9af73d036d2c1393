"""Canonical views: the kernels only ever see these, never an arbitrary stride pattern.

Per-channel statistics (BatchNorm, InstanceNorm, GroupNorm before its groups are merged)
run on ``(P, C, Q)``: contiguous input is ``(outer, C, inner)`` around the channel axis,
channels-last input is ``(N * spatial, C, 1)`` over the same memory. Statistics groups are
chunks of rows of dim 0 (see :mod:`batchnorm.kernels.reference`), so a sample is
``rows_per_sample`` consecutive rows in either layout. LayerNorm runs on rows ``(R, K)``.
Views are taken without copying whenever the input's memory allows it.
"""

from __future__ import annotations

import math

from torch import Tensor


def is_channels_last(x: Tensor, axis: int) -> bool:
    """True when ``x``'s memory is ordered with channel ``axis`` innermost (and it is not
    also plainly contiguous): such input is read in place as ``(M, C, 1)``."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(axis, -1).is_contiguous()


def channel_view(x: Tensor, axis: int, channels_last: bool) -> Tensor:
    """``x`` as ``(P, C, Q)`` for per-channel statistics of channel ``axis``; ``channels_last``
    (from :func:`is_channels_last` of the forward input) picks the layout, so that a
    gradient is viewed exactly like its input (copying it when its memory differs)."""
    channels = x.shape[axis]
    if channels_last:
        return x.movedim(axis, -1).reshape(-1, channels, 1)
    x = x.contiguous()
    return x.view(math.prod(x.shape[:axis]), channels, math.prod(x.shape[axis + 1:]))


def restore(y: Tensor, like: Tensor, axis: int, channels_last: bool) -> Tensor:
    """A ``(P, C, Q)`` result back in the shape of ``like``, in the view's memory order."""
    if channels_last:
        return y.view(like.movedim(axis, -1).shape).movedim(-1, axis)
    return y.view(like.shape)


def rows_per_sample(x: Tensor, axis: int, channels_last: bool) -> int:
    """Rows of the ``(P, C, Q)`` view that belong to one sample (dim 0 of ``x``)."""
    if channels_last:
        return math.prod(x.shape[1:]) // x.shape[axis]
    return math.prod(x.shape[1:axis])


def row_view(x: Tensor, normalized_ndim: int) -> Tensor:
    """``x`` as ``(R, K)``: statistics over the trailing ``normalized_ndim`` dims (LayerNorm)."""
    x = x.contiguous()
    split = x.dim() - normalized_ndim
    return x.view(math.prod(x.shape[:split]), math.prod(x.shape[split:]))
