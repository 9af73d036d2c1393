"""Functional normalizations with torch.nn.functional's signatures, on one core.

Each function only validates its arguments (with torch's error types and messages), picks
the canonical view whose reduced dims define it, and hands over to
:func:`batchnorm.core.policy.normalize_view`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from batchnorm.core.activation import make_activation
from batchnorm.core.layout import View, channel_view, group_view, row_view
from batchnorm.core.policy import Renorm, StatsReducer, normalize_view
from batchnorm.core.spec import NormSpec
from batchnorm.kernels import reference

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "moments"]


def _check_eps(eps: float, training: bool) -> None:
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_per_channel(name: str, tensor: Tensor | None, channels: int) -> None:
    if tensor is not None and tensor.numel() != channels:
        # torch's type; the words the right way round (torch's text names them backwards)
        raise RuntimeError(f"expected input with {tensor.numel()} channels (the size of "
                           f"{name}), got input with {channels} channels")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise IndexError(f"axis must be in [{-ndim}, {ndim - 1}] for a {ndim}D input, "
                         f"got {axis}")
    return axis % ndim


def check_ghost_batch_size(ghost_batch_size: int | None) -> None:
    """A ghost batch needs at least two samples to have a variance."""
    if ghost_batch_size is not None and (not isinstance(ghost_batch_size, int)
                                         or isinstance(ghost_batch_size, bool)
                                         or ghost_batch_size < 2):
        raise ValueError("ghost_batch_size must be None or an integer >= 2, got "
                         f"{ghost_batch_size!r}")


def _ghost_rows(view_rows: int, batch: int, ghost_batch_size: int, axis: int) -> int:
    """Rows of the canonical view per ghost batch; every chunk must hold two samples."""
    if axis == 0:
        raise ValueError("ghost_batch_size splits dim 0 (the batch), which cannot also be the "
                         "channel axis; got axis=0")
    if batch % ghost_batch_size == 1:
        raise ValueError(f"ghost_batch_size={ghost_batch_size} splits a batch of N={batch} "
                         "samples into chunks whose last one has 1 sample; a ghost batch needs "
                         "at least 2 samples: use a ghost_batch_size that leaves no single "
                         "sample (e.g. a divisor of N) or drop the incomplete last batch")
    return view_rows // batch * ghost_batch_size


def _renorm_policy(training: bool, renorm: bool, renorm_clipping: Mapping[str, float] | None,
                   running_mean: Tensor | None, running_var: Tensor | None,
                   renorm_mean: Tensor | None, renorm_var: Tensor | None,
                   renorm_momentum: float, channels: int) -> Renorm | None:
    if not renorm:
        if renorm_clipping is not None or renorm_mean is not None or renorm_var is not None:
            raise ValueError("renorm_clipping, renorm_mean and renorm_var need renorm=True")
        return None
    policy = Renorm.from_clipping(renorm_clipping, mean=renorm_mean, var=renorm_var,
                                  momentum=renorm_momentum)
    if not training:
        return None
    if (renorm_mean is None) != (renorm_var is None):
        raise ValueError("renorm_mean and renorm_var must be given together, got "
                         f"renorm_mean={type(renorm_mean).__name__}, "
                         f"renorm_var={type(renorm_var).__name__}")
    for name, tensor in (("renorm_mean", renorm_mean), ("renorm_var", renorm_var)):
        _check_per_channel(name, tensor, channels)
    if renorm_mean is None and (running_mean is None or running_var is None):
        raise ValueError("renorm=True measures r and d against running_mean and running_var "
                         "(or renorm_mean and renorm_var), but they were not given")
    return policy


def _normalize_per_sample(view: View, weight: Tensor | None, bias: Tensor | None,
                          eps: float) -> Tensor:
    """GroupNorm and LayerNorm: statistics of the input itself, never running ones."""
    _check_eps(eps, training=False)
    spec = NormSpec(view.reduce_dims, view.param_shape, eps)
    return normalize_view(view, spec, weight, bias, use_batch_stats=True)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, activation: str | None = None,
               activation_param: float | None = None, ghost_batch_size: int | None = None,
               renorm: bool = False, renorm_clipping: Mapping[str, float] | None = None,
               renorm_mean: Tensor | None = None, renorm_var: Tensor | None = None,
               renorm_momentum: float = 0.1,
               reducer: StatsReducer | None = None) -> Tensor:
    """Batch normalization over every dim but ``axis`` (the channel axis; ``-1`` for
    channels-last / TensorFlow layout), optionally followed by a fused activation.

    In training, ``ghost_batch_size`` normalizes each chunk of that many samples (dim 0)
    with its own statistics; ``renorm=True`` applies Batch Renormalization with r and d
    clipped by ``renorm_clipping`` and measured against ``renorm_mean``/``renorm_var``
    (updated with ``renorm_momentum``) or, when those are None, the running statistics.
    See :class:`batchnorm.core.policy.Renorm`. Both are ignored in eval mode."""
    if input.dim() < 2 and axis == 1:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    axis = _normalize_axis(axis, input.dim())
    channels = input.shape[axis]
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        _check_per_channel(name, tensor, channels)
    if training:
        values_per_channel = input.numel() // max(channels, 1)
        if values_per_channel == 1 and reducer is None:  # a reducer checks the merged count
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    _check_eps(eps, training)
    check_ghost_batch_size(ghost_batch_size)
    renorm_policy = _renorm_policy(training, renorm, renorm_clipping, running_mean,
                                   running_var, renorm_mean, renorm_var, renorm_momentum,
                                   channels)
    view = channel_view(input, axis)
    spec = NormSpec(view.reduce_dims, view.param_shape, eps,
                    make_activation(activation, activation_param))
    ghost_rows = None
    if training and ghost_batch_size is not None and input.shape[0] > 0:
        ghost_rows = _ghost_rows(view.x.shape[0], input.shape[0], ghost_batch_size, axis)
    return normalize_view(view, spec, weight, bias, use_batch_stats=training,
                          running_mean=running_mean, running_var=running_var,
                          momentum=momentum, reducer=reducer, ghost_rows=ghost_rows,
                          renorm=renorm_policy)


def instance_norm(input: Tensor, running_mean: Tensor | None = None,
                  running_var: Tensor | None = None, weight: Tensor | None = None,
                  bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Instance normalization: statistics per sample and channel over the spatial dims."""
    if input.dim() < 3:
        raise ValueError(f"expected at least 3D input (got {input.dim()}D input)")
    channels = input.shape[1]
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        _check_per_channel(name, tensor, channels)
    if use_input_stats:
        if math.prod(input.shape[2:]) == 1:
            raise ValueError("Expected more than 1 spatial element when training, "
                             f"got input size {input.size()}")
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when "
                         "use_input_stats=False")
    _check_eps(eps, training=False)
    view = group_view(input, channels)
    spec = NormSpec(view.reduce_dims, view.param_shape, eps)
    return normalize_view(view, spec, weight, bias, use_batch_stats=use_input_stats,
                          running_mean=running_mean, running_var=running_var,
                          momentum=momentum)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Group normalization: statistics per sample over each group of channels."""
    if input.dim() < 2:
        raise RuntimeError("Expected at least 2 dimensions for input tensor but received "
                           f"{input.dim()}")
    channels = input.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise RuntimeError("Expected number of channels in input to be divisible by "
                           f"num_groups, but got input of shape {list(input.shape)} and "
                           f"num_groups={num_groups}")
    group_batch = [input.shape[0] * channels // num_groups, num_groups, *input.shape[2:]]
    if math.prod(group_batch) // num_groups == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {group_batch}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dim() != 1 or tensor.numel() != channels):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number "
                               f"of channels in input, but got {name} of shape "
                               f"{list(tensor.shape)} and input of shape {list(input.shape)}")
    return _normalize_per_sample(group_view(input, num_groups), weight, bias, eps)


def layer_norm(input: Tensor, normalized_shape: Sequence[int] | int,
               weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    ndim = len(shape)
    if ndim == 0 or input.dim() < ndim or tuple(input.shape[input.dim() - ndim:]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size"
                           f"{list(input.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, "
                               f"but got {name} of shape {list(tensor.shape)} and "
                               f"normalized_shape = {list(shape)}")
    return _normalize_per_sample(row_view(input, ndim), weight, bias, eps)


def moments(x: Tensor, dims: int | Sequence[int], correction: int = 0,
            keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and variance over ``dims`` with the core's accurate shifted two-pass sums
    (``correction=1`` for the unbiased variance); half precision returns float32."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(sorted(_normalize_axis(d, x.dim()) for d in dims))
    mean, var = reference.moments(x, dims)
    count = math.prod(x.shape[d] for d in dims)
    if correction:
        var = var * (count / max(count - correction, 0)) if count > correction else \
            torch.full_like(var, math.nan)
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var
