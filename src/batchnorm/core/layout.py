"""Canonical views: the kernels only ever see these, never an arbitrary stride pattern.

Per-channel statistics (BatchNorm):  ``(P, C, Q)`` contiguous, reduced over (0, 2), or
``(M, C)`` channels-last, reduced over (0,).  Per-sample-group statistics (GroupNorm,
InstanceNorm with G = C): ``(N, G, C/G, L)`` reduced over (2, 3), or channels-last
``(N, L, G, C/G)`` reduced over (1, 3).  Rows (LayerNorm): ``(R, K)`` reduced over (1,).
Ghost batches split a per-channel view's leading dim once more: ``(chunks, P / chunks, C, Q)``
or ``(chunks, M / chunks, C)``, reduced over the same dims shifted by one.
Views are taken without copying whenever the input's memory allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class View:
    """A canonical view of an input and the way back to the input's shape and strides."""

    x: Tensor
    reduce_dims: tuple[int, ...]
    param_shape: tuple[int, ...]
    restore: Callable[[Tensor], Tensor]

    @property
    def count(self) -> int:
        """Values reduced into one statistic."""
        return math.prod(self.x.shape[d] for d in self.reduce_dims)


def _channels_last_order(x: Tensor, axis: int) -> bool:
    return x.dim() > 2 and x.movedim(axis, -1).is_contiguous() and not x.is_contiguous()


def channel_view(x: Tensor, axis: int) -> View:
    """Per-channel statistics of channel ``axis`` (BatchNorm), without transposing."""
    channels = x.shape[axis]
    if _channels_last_order(x, axis):
        moved = x.movedim(axis, -1)
        flat = moved.reshape(-1, channels)
        return View(flat, (0,), (1, channels),
                    lambda y: y.view(moved.shape).movedim(-1, axis))
    x = x.contiguous()
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    if inner == 1:
        return View(x.view(outer, channels), (0,), (1, channels), lambda y: y.view(x.shape))
    return View(x.view(outer, channels, inner), (0, 2), (1, channels, 1),
                lambda y: y.view(x.shape))


def ghost_views(view: View, rows_per_chunk: int) -> tuple[View, ...]:
    """Ghost batches of a per-channel view: its leading (batch-major) dim in chunks of
    ``rows_per_chunk`` rows, each chunk with statistics of its own.

    The whole chunks form one ``(chunks, rows_per_chunk, ...)`` view, so that one kernel
    call reduces all of them; a shorter last chunk, when the rows do not divide, is a second
    ``(1, rest, ...)`` view. Each view restores to its own slice of ``view.x``."""
    x = view.x
    rows = x.shape[0]
    whole = rows - rows % rows_per_chunk
    reduce_dims = tuple(d + 1 for d in view.reduce_dims)
    param_shape = (1, *view.param_shape)
    views = []
    for part, chunk_rows in ((x[:whole], rows_per_chunk), (x[whole:], rows - whole)):
        if chunk_rows == 0 or part.shape[0] == 0:
            continue
        views.append(View(part.view(part.shape[0] // chunk_rows, chunk_rows, *x.shape[1:]),
                          reduce_dims, param_shape,
                          lambda y, shape=part.shape: y.view(shape)))
    return tuple(views)


def group_view(x: Tensor, groups: int) -> View:
    """Per-sample, per-group statistics over channel axis 1 (GroupNorm; InstanceNorm when
    ``groups`` equals the channel count)."""
    n, channels = x.shape[0], x.shape[1]
    per_group = channels // groups
    if _channels_last_order(x, 1):
        moved = x.movedim(1, -1)
        view = moved.reshape(n, math.prod(moved.shape[1:-1]), groups, per_group)
        return View(view, (1, 3), (1, 1, groups, per_group),
                    lambda y: y.view(moved.shape).movedim(-1, 1))
    x = x.contiguous()
    view = x.view(n, groups, per_group, math.prod(x.shape[2:]))
    return View(view, (2, 3), (1, groups, per_group, 1), lambda y: y.view(x.shape))


def row_view(x: Tensor, normalized_ndim: int) -> View:
    """Statistics over the trailing ``normalized_ndim`` dims (LayerNorm)."""
    x = x.contiguous()
    split = x.dim() - normalized_ndim
    rows, width = math.prod(x.shape[:split]), math.prod(x.shape[split:])
    return View(x.view(rows, width), (1,), (1, width), lambda y: y.view(x.shape))
