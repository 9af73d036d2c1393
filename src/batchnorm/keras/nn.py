"""``tf.nn.moments`` and ``tf.nn.batch_normalization`` on torch tensors, with TF's formulas."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from batchnorm import functional


def moments(x: Tensor, axes: int | Sequence[int], keepdims: bool = False
            ) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``axes`` (``tf.nn.moments``)."""
    return functional.moments(x, axes, correction=0, keepdim=keepdims)


def batch_normalization(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
                        scale: Tensor | None, variance_epsilon: float) -> Tensor:
    """``tf.nn.batch_normalization``: every argument broadcasts against ``x``, and the
    result is computed as TF does, ``x * inv + (offset - mean * inv)`` with
    ``inv = scale / sqrt(variance + variance_epsilon)``, differentiable in all tensors."""
    if variance_epsilon < 0:
        raise ValueError(f"variance_epsilon must be non-negative, got {variance_epsilon}")
    inv = torch.rsqrt(variance + variance_epsilon)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv if offset is None else offset - mean * inv
    return x * inv.to(x.dtype) + shift.to(x.dtype)
