"""Functional normalizations with torch.nn.functional's signatures, on one core.

Each function validates its arguments (with torch's error types and messages) and calls
the registered operators of :mod:`batchnorm.ops`: one forward operator, then, in training,
the running-statistics update. Under ``torch.func`` transforms the core runs directly on
the reference primitives (plain torch ops), which every transform understands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from batchnorm import ops
from batchnorm.core import decomposed, normalize
from batchnorm.core.activation import make_activation
from batchnorm.core.policy import RENORM_KEYS, follow_batch
from batchnorm.core.sync import StatsReducer, sync_batch_norm
from batchnorm.kernels import reference

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "moments"]


def _check_eps(eps: float, training: bool) -> None:
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


_CHANNEL_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _check_per_channel(channels: int, names: tuple[str, ...],
                       tensors: tuple[Tensor | None, ...]) -> None:
    """Each given tensor holds one value per channel."""
    for name, tensor in zip(names, tensors, strict=True):
        if tensor is not None and tensor.numel() != channels:
            # torch's type; the words the right way round (torch's text names them backwards)
            raise RuntimeError(f"expected input with {tensor.numel()} channels (the size of "
                               f"{name}), got input with {channels} channels")


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


_PARAMETER_NAMES = ("weight", "bias", "running_mean", "running_var")


def _check_dtypes(op: str, input: Tensor, *tensors: Tensor | None) -> None:
    """torch's contract: floating input only; parameters and buffers (weight, bias and, for
    the layers that have them, running_mean and running_var) of the input's dtype, or
    float32 beside float16/bfloat16 input (mixed precision)."""
    dtype = input.dtype
    if dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{op}: input dtype {input.dtype} is not supported; expected one "
                           "of float16, bfloat16, float32, float64")
    for name, tensor in zip(_PARAMETER_NAMES, tensors, strict=False):
        if tensor is None or tensor.dtype == dtype:
            continue
        if not (input.dtype in _HALF_DTYPES and tensor.dtype == torch.float32):
            raise RuntimeError(f"{op}: {name} has dtype {tensor.dtype} but input has dtype "
                               f"{input.dtype}; expected {input.dtype}"
                               + (" or torch.float32" if input.dtype in _HALF_DTYPES else ""))


def _check_channel_tensors(op: str, input: Tensor, channels: int,
                           running_mean: Tensor | None, running_var: Tensor | None,
                           weight: Tensor | None, bias: Tensor | None) -> None:
    """:func:`_check_per_channel` and :func:`_check_dtypes` of the four per-channel tensors,
    in one loop for the common case (float input, every tensor of its dtype and size): these
    checks run on every call of a layer, where a few microseconds are a fair share of a small
    batch's time. Anything else takes the two checks, which raise their errors in order."""
    dtype = input.dtype
    if dtype in _FLOAT_DTYPES:
        for tensor in (running_mean, running_var, weight, bias):
            if tensor is not None and (tensor.dtype != dtype or tensor.numel() != channels):
                break
        else:
            return
    _check_per_channel(channels, _CHANNEL_TENSORS, (running_mean, running_var, weight, bias))
    _check_dtypes(op, input, weight, bias, running_mean, running_var)


def _check_buffers_need_no_grad(running_mean: Tensor | None, running_var: Tensor | None
                                ) -> None:
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None and tensor.requires_grad:
            raise RuntimeError(f"{name} must not require grad: running statistics are "
                               "updated in place in training, got requires_grad=True")


def _transforms_active() -> bool:
    """Inside torch.func transforms (grad, vmap, jvp): run the core on plain torch ops."""
    return torch._C._are_functorch_transforms_active()


def _untransformed(stat: Tensor) -> Tensor:
    """A batch statistic's value outside the torch.func transforms, for the running buffers,
    which the transforms do not track (as the operators, which run below them, leave them);
    under ``vmap`` each sample would have its own, so that raises."""
    stat = stat.detach()
    while torch._C._functorch.is_functorch_wrapped_tensor(stat):
        if torch._C._functorch.is_batchedtensor(stat):
            raise RuntimeError("running statistics cannot follow a batch under vmap: call the "
                               "layer in eval mode, or pass the buffers to "
                               "torch.func.functional_call")
        stat = torch._C._functorch.get_unwrapped(stat)
    return stat


DECOMPOSE_UNDER_COMPILE = True
"""Under ``torch.compile`` (not ``torch.export``), plain BatchNorm/GroupNorm/LayerNorm
trace as the ATen operators torch.nn's compile to (:mod:`batchnorm.core.decomposed`), which
Inductor fuses with their neighbours; False keeps the operators (the bench measures both)."""


def _exporting() -> bool:
    """``torch.compiler.is_exporting()``, which dynamo before torch 2.13 folds to True under
    ``torch.compile`` too; the flag behind it, read as a global, is right in both (it
    exists from torch 2.11, the oldest supported)."""
    return torch.compiler._is_exporting_flag


def _decompose() -> bool:
    return DECOMPOSE_UNDER_COMPILE and torch.compiler.is_compiling() and not _exporting()


def _renorm_limits(renorm_clipping: Mapping[str, float] | None) -> list[float]:
    """``(rmax, rmin, dmax)`` from TensorFlow-style ``renorm_clipping`` (any subset; the
    missing ones do not clip)."""
    clipping = {} if renorm_clipping is None else renorm_clipping
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a mapping with keys among {RENORM_KEYS}, "
                        f"got {clipping!r}")
    unknown = sorted(set(clipping) - set(RENORM_KEYS))
    if unknown:
        raise ValueError(f"renorm_clipping keys must be among {RENORM_KEYS}, got {unknown}")
    rmax, rmin, dmax = (float(clipping.get(key, default))
                        for key, default in zip(RENORM_KEYS, (math.inf, 0.0, math.inf),
                                                strict=True))
    if not 0.0 <= rmin <= 1.0 <= rmax:
        raise ValueError("renorm_clipping must have 0 <= rmin <= 1 <= rmax, got "
                         f"rmin={rmin}, rmax={rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"renorm_clipping dmax must be >= 0, got {dmax}")
    return [rmax, rmin, dmax]


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


def check_ghost_batches(batch: int, ghost_batch_size: int, axis: int) -> None:
    """Every ghost batch (chunk of dim 0) must hold two samples."""
    if axis == 0:
        raise ValueError("ghost_batch_size splits dim 0 (the batch), which cannot also be the "
                         "channel axis; got axis=0")
    if batch % ghost_batch_size == 1:
        raise ValueError(f"ghost_batch_size={ghost_batch_size} splits a batch of N={batch} "
                         "samples into chunks whose last one has 1 sample; a ghost batch needs "
                         "at least 2 samples: use a ghost_batch_size that leaves no single "
                         "sample (e.g. a divisor of N) or drop the incomplete last batch")


def _normalize_channels(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                        running_mean: Tensor | None, running_var: Tensor | None,
                        num_batches_tracked: Tensor | None, training: bool,
                        momentum: float | None, eps: float, axis: int, chunk: int,
                        activation: str, activation_param: float,
                        renorm_clipping: list[float] | None, renorm_mean: Tensor | None,
                        renorm_var: Tensor | None, renorm_momentum: float,
                        residual: Tensor | None = None) -> Tensor:
    """One forward operator, which (training) also moves the running statistics once it
    accepted the batch."""
    if _transforms_active():
        out, mean, var, _, _ = normalize.batch_norm_forward(
            reference, input, weight, bias, running_mean, running_var, training, eps, axis,
            chunk, activation, activation_param, renorm_clipping, renorm_mean, renorm_var,
            check=False, residual=residual)
        if training and running_mean is not None:
            with torch._C._DisableFuncTorch():  # buffers the transforms do not track
                follow_batch(input.shape, axis, chunk, _untransformed(mean),
                             _untransformed(var), running_mean, running_var,
                             num_batches_tracked, momentum, renorm_mean, renorm_var,
                             renorm_momentum)
        return out
    if residual is not None:
        return ops.normalized("batch_norm_add", input, residual, weight, bias, running_mean,
                              running_var, num_batches_tracked, training, momentum, eps, axis,
                              chunk, activation, activation_param)
    if (axis == 1 and chunk == 0 and activation == "identity" and renorm_clipping is None
            and renorm_mean is None):
        # the schema's defaults: an operator call converts each argument it is given
        return ops.normalized("batch_norm", input, weight, bias, running_mean, running_var,
                              num_batches_tracked, training, momentum, eps)
    return ops.normalized("batch_norm", input, weight, bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps, axis, chunk, activation,
                          activation_param, renorm_clipping, renorm_mean, renorm_var,
                          renorm_momentum)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
               axis: int = 1, activation: str | None = None,
               activation_param: float | None = None, ghost_batch_size: int | None = None,
               renorm: bool = False, renorm_clipping: Mapping[str, float] | None = None,
               renorm_mean: Tensor | None = None, renorm_var: Tensor | None = None,
               renorm_momentum: float = 0.1, num_batches_tracked: Tensor | None = None,
               reducer: StatsReducer | None = None, residual: Tensor | None = None) -> Tensor:
    """Batch normalization over every dim but ``axis`` (the channel axis; ``-1`` for
    channels-last / TensorFlow layout), optionally followed by a fused activation; with
    ``residual`` (the input's shape and dtype) ``act(BatchNorm(input) + residual)`` in one
    operator, the tail of a ResNet block.

    In training, ``ghost_batch_size`` normalizes each chunk of that many samples (dim 0)
    with its own statistics; ``renorm=True`` applies Batch Renormalization with r and d
    clipped by ``renorm_clipping`` and measured against ``renorm_mean``/``renorm_var``
    (updated with ``renorm_momentum``) or, when those are None, the running statistics.
    Both are ignored in eval mode. ``num_batches_tracked`` counts accepted training
    batches; with ``momentum=None`` the running statistics are then cumulative averages.
    A ``reducer`` (SyncBatchNorm) makes the training statistics those of the batch of every
    process it reaches, unless ghost batches keep them per process."""
    dim = input.dim()
    if dim < 2 and axis == 1:
        raise ValueError(f"expected at least 2D input (got {dim}D input)")
    if not 0 <= axis < dim:
        axis = _normalize_axis(axis, dim)
    channels = input.shape[axis]
    _check_channel_tensors("batch_norm", input, channels, running_mean, running_var, weight,
                           bias)
    if training:
        if input.numel() // max(channels, 1) == 1 and reducer is None:  # it checks the merge
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
        _check_buffers_need_no_grad(running_mean, running_var)
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    _check_eps(eps, training)
    if ghost_batch_size is not None:
        check_ghost_batch_size(ghost_batch_size)
    act = make_activation(activation, activation_param)
    clipping = None
    if renorm:
        clipping = _renorm_limits(renorm_clipping)
        if training:
            _check_renorm_references(running_mean, running_var, renorm_mean, renorm_var,
                                     channels)
    elif renorm_clipping is not None or renorm_mean is not None or renorm_var is not None:
        raise ValueError("renorm_clipping, renorm_mean and renorm_var need renorm=True")
    if residual is not None:
        _check_residual(input, residual, renorm)
    chunk = 0
    if training and ghost_batch_size is not None and input.shape[0] > 0:
        check_ghost_batches(input.shape[0], ghost_batch_size, axis)
        chunk = ghost_batch_size
    if chunk == 0 and clipping is None and reducer is None and _decompose():
        return decomposed.batch_norm(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked if training else None, training,
                                     momentum, eps, axis, act.name, act.param, residual)
    if training and reducer is not None and ghost_batch_size is None:
        return sync_batch_norm(input, weight, bias, running_mean, running_var,
                               num_batches_tracked, momentum, eps, axis, act.name, act.param,
                               clipping, renorm_mean, renorm_var, renorm_momentum, reducer,
                               residual)
    return _normalize_channels(input, weight, bias, running_mean, running_var,
                               num_batches_tracked, training, momentum, eps, axis, chunk,
                               act.name, act.param, clipping if training else None,
                               renorm_mean if training else None,
                               renorm_var if training else None, renorm_momentum, residual)


def _check_residual(input: Tensor, residual: Tensor, renorm: bool) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != input.shape or residual.dtype != input.dtype \
            or residual.device != input.device:
        raise ValueError("residual must match the input: expected shape "
                         f"{tuple(input.shape)}, {input.dtype} on {input.device}, got shape "
                         f"{tuple(residual.shape)}, {residual.dtype} on {residual.device}")
    if renorm:
        raise ValueError("residual is not supported with renorm=True; add the residual to "
                         "the layer's output instead")


def _check_renorm_references(running_mean: Tensor | None, running_var: Tensor | None,
                             renorm_mean: Tensor | None, renorm_var: Tensor | None,
                             channels: int) -> None:
    if (renorm_mean is None) != (renorm_var is None):
        raise ValueError("renorm_mean and renorm_var must be given together, got "
                         f"renorm_mean={type(renorm_mean).__name__}, "
                         f"renorm_var={type(renorm_var).__name__}")
    _check_per_channel(channels, ("renorm_mean", "renorm_var"), (renorm_mean, renorm_var))
    if renorm_mean is None and (running_mean is None or running_var is None):
        raise ValueError("renorm=True measures r and d against running_mean and running_var "
                         "(or renorm_mean and renorm_var), but they were not given")


def instance_norm(input: Tensor, running_mean: Tensor | None = None,
                  running_var: Tensor | None = None, weight: Tensor | None = None,
                  bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Instance normalization: statistics per sample and channel over the spatial dims
    (BatchNorm with chunks of one sample; the running statistics average the instances)."""
    if input.dim() < 3:
        raise ValueError(f"expected at least 3D input (got {input.dim()}D input)")
    _check_channel_tensors("instance_norm", input, input.shape[1], running_mean, running_var,
                           weight, bias)
    if use_input_stats:
        if math.prod(input.shape[2:]) == 1:
            raise ValueError("Expected more than 1 spatial element when training, "
                             f"got input size {input.size()}")
        _check_buffers_need_no_grad(running_mean, running_var)
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when "
                         "use_input_stats=False")
    _check_eps(eps, training=False)
    return _normalize_channels(input, weight, bias, running_mean, running_var, None,
                               use_input_stats, momentum, eps, 1, 1, "identity", 0.0, None,
                               None, None, 0.0)


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
    _check_dtypes("group_norm", input, weight, bias)
    _check_eps(eps, training=False)
    if _decompose():
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    if _transforms_active():
        return normalize.group_norm_forward(reference, input, weight, bias, num_groups, eps,
                                            check=False)[0]
    return ops.normalized("group_norm", input, weight, bias, num_groups, eps)


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
    _check_dtypes("layer_norm", input, weight, bias)
    _check_eps(eps, training=False)
    if _decompose():
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    if _transforms_active():
        return normalize.layer_norm_forward(reference, input, ndim, weight, bias, eps,
                                            check=False)[0]
    return ops.normalized("layer_norm", input, ndim, weight, bias, eps)


def moments(x: Tensor, dims: int | Sequence[int], correction: int = 0,
            keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and variance over ``dims`` with the core's accurate shifted two-pass sums
    (``correction=1`` for the unbiased variance); half precision returns float32."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(sorted(_normalize_axis(d, x.dim()) for d in dims))
    kept = [d for d in range(x.dim()) if d not in dims]
    count = math.prod(x.shape[d] for d in dims)
    rows = x.permute(*kept, *dims).reshape(-1, 1, count)
    mean, var = reference.channel_stats(rows, 1)
    stat_shape = [1 if d in dims else size for d, size in enumerate(x.shape)]
    mean, var = mean.view(stat_shape), var.view(stat_shape)
    if correction:
        var = var * (count / max(count - correction, 0)) if count > correction else \
            torch.full_like(var, math.nan)
    if not keepdim:
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var
