"""The normalizations as registered PyTorch operators in the ``batchnorm::`` namespace.

Each operator has a schema, a fake (meta) kernel for tracing without data, an autograd
formula, and an implementation for every device: the composite one here (the core over
the kernel primitives :func:`batchnorm.kernels.primitives` picks for the input), which a
device-specific compiled kernel may replace. The dispatcher, autograd, ``torch.compile``,
``torch.export``, FX, ``torch.jit.trace`` and the profiler then see our layers as they see
torch's own. In training the BatchNorm forward operators also move the running buffers
they are given (as ``aten::native_batch_norm`` does), once the batch is accepted: a batch
with NaN or infinity raises ``ValueError`` from the operator and changes no buffer.
:func:`batch_norm_add` is the ResNet block's tail, ``act(BatchNorm(x) + residual)``, as one
operator.

The plain layers run on torch's own kernels where :func:`batchnorm.kernels.native` says so
(``BATCHNORM_BACKEND=aten``; :mod:`batchnorm.ops.native`), the variants on the kernel
primitives.

Double backward and ``torch.func`` transforms use :mod:`batchnorm.core.normalize` with the
reference primitives directly: plain torch ops that every transform differentiates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.core import layout, normalize
from batchnorm.core.policy import follow_batch
from batchnorm.kernels import extension, reference
from batchnorm.kernels.reference import accumulation_dtype
from batchnorm.ops import native

__all__ = ["batch_norm", "batch_norm_add", "group_norm", "layer_norm", "normalized"]

_lib = torch.library.Library("batchnorm", "DEF")
_SCHEMAS = {
    "batch_norm": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                  "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
                  "float? momentum, float eps, int axis=1, int chunk=0, "
                  "str activation='identity', float activation_param=0., "
                  "float[]? renorm_clipping=None, Tensor(d!)? renorm_mean=None, "
                  "Tensor(e!)? renorm_var=None, float renorm_momentum=0.1) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_backward": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
                           "Tensor mean, Tensor var, Tensor renorm_r, Tensor renorm_d, "
                           "bool training, float eps, int axis, int chunk, str activation, "
                           "float activation_param, bool[3] output_mask) "
                           "-> (Tensor, Tensor, Tensor)",
    "batch_norm_backward_differentiable": "(Tensor grad_output, Tensor input, Tensor? weight, "
                                          "Tensor? bias, Tensor mean, Tensor var, "
                                          "Tensor renorm_r, Tensor renorm_d, bool training, "
                                          "float eps, int axis, int chunk, str activation, "
                                          "float activation_param, bool[3] output_mask) "
                                          "-> (Tensor, Tensor, Tensor)",
    "batch_norm_add": "(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
                      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                      "Tensor(c!)? num_batches_tracked, bool training, float? momentum, "
                      "float eps, int axis=1, int chunk=0, str activation='identity', "
                      "float activation_param=0.) -> (Tensor, Tensor, Tensor)",
    "batch_norm_add_backward": "(Tensor grad_output, Tensor input, Tensor residual, "
                               "Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
                               "bool training, float eps, int axis, int chunk, str activation, "
                               "float activation_param, bool[4] output_mask) "
                               "-> (Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_add_backward_differentiable": "(Tensor grad_output, Tensor input, "
                                              "Tensor residual, Tensor? weight, Tensor? bias, "
                                              "Tensor mean, Tensor var, bool training, "
                                              "float eps, int axis, int chunk, "
                                              "str activation, float activation_param, "
                                              "bool[4] output_mask) "
                                              "-> (Tensor, Tensor, Tensor, Tensor)",
    "group_norm": "(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps) "
                  "-> (Tensor, Tensor, Tensor)",
    "group_norm_backward": "(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
                           "Tensor mean, Tensor invstd, int num_groups, bool[3] output_mask) "
                           "-> (Tensor, Tensor, Tensor)",
    "group_norm_backward_differentiable": "(Tensor grad_output, Tensor input, Tensor? weight, "
                                          "Tensor? bias, Tensor mean, Tensor invstd, "
                                          "int num_groups, float eps, bool[3] output_mask) "
                                          "-> (Tensor, Tensor, Tensor)",
    "layer_norm": "(Tensor input, int normalized_ndim, Tensor? weight, Tensor? bias, "
                  "float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward": "(Tensor grad_output, Tensor input, int normalized_ndim, "
                           "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
                           "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward_differentiable": "(Tensor grad_output, Tensor input, "
                                          "int normalized_ndim, Tensor? weight, Tensor? bias, "
                                          "float eps, bool[3] output_mask) "
                                          "-> (Tensor, Tensor, Tensor)",
}
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Operators return an empty tensor for a gradient that was not asked for."""
    return like.new_empty((0,)) if t is None else t


# Composite implementations: the core over the primitives picked for the input. They check
# what the compiled ones check (csrc/norm_ops.cpp), so that a direct operator call with a
# mismatched tensor names it on either path instead of failing in a broadcast.

def _check_sizes(op: str, expected: int, **tensors: Tensor | None) -> None:
    """Each given tensor holds ``expected`` values."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.numel() != expected:
            raise RuntimeError(f"{op}: {name} has {tensor.numel()} values, expected {expected}")


def _check_grad_shape(op: str, grad_output: Tensor, input: Tensor) -> None:
    if grad_output.shape != input.shape:
        raise RuntimeError(f"{op}: grad_output has shape {list(grad_output.shape)}, expected "
                           f"the input's {list(input.shape)}")


def _check_batch_norm_backward(op: str, grad_output: Tensor, input: Tensor,
                               weight: Tensor | None, bias: Tensor | None, training: bool,
                               axis: int, chunk: int, **stats: Tensor | None) -> None:
    """The gradient's shape, and the statistics of each (chunk, channel)."""
    _check_grad_shape(op, grad_output, input)
    if input.numel():
        channels = input.shape[axis]
        _check_sizes(op, channels, weight=weight, bias=bias)
        _check_sizes(op, _chunks(input, training, chunk) * channels, **stats)


def _plain_native(input, training, axis, chunk, activation, renorm, *tensors):
    """Plain BatchNorm, or InstanceNorm (chunks of one sample), that torch's kernels run
    here."""
    instances = training and chunk == 1 and input.dim() > 2
    return (axis == 1 and (chunk == 0 or instances or not training)
            and activation == "identity" and not renorm
            and native.handles(input, *tensors, channels_last=not instances))


def _batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, training,
                momentum, eps, axis=1, chunk=0, activation="identity", activation_param=0.0,
                renorm_clipping=None, renorm_mean=None, renorm_var=None, renorm_momentum=0.1):
    _check_sizes("batch_norm", input.shape[axis], weight=weight, bias=bias,
                 running_mean=running_mean, running_var=running_var, renorm_mean=renorm_mean,
                 renorm_var=renorm_var)
    if _plain_native(input, training, axis, chunk, activation, renorm_clipping is not None,
                     weight, bias, running_mean, running_var):
        outputs = native.batch_norm(input, weight, bias, running_mean, running_var, training,
                                    eps, instances=chunk == 1)
    else:
        with torch.no_grad():
            outputs = normalize.batch_norm_forward(
                kernels.primitives(input), input, weight, bias, running_mean, running_var,
                training, eps, axis, chunk, activation, activation_param, renorm_clipping,
                renorm_mean, renorm_var)
    if training and running_mean is not None:
        follow_batch(input.shape, axis, chunk, *outputs[1:3], running_mean, running_var,
                     num_batches_tracked, momentum, renorm_mean, renorm_var, renorm_momentum)
    return outputs


def _batch_norm_backward(grad_output, input, weight, bias, mean, var, renorm_r, renorm_d,
                         training, eps, axis, chunk, activation, activation_param,
                         output_mask):
    renorm = renorm_r.numel() > 0
    _check_batch_norm_backward("batch_norm_backward", grad_output, input, weight, bias,
                               training, axis, chunk, mean=mean, var=var,
                               renorm_r=renorm_r if renorm else None,
                               renorm_d=renorm_d if renorm else None)
    if _plain_native(input, training, axis, chunk, activation, renorm, weight,
                     bias, mean, var):
        grads = native.batch_norm_backward(grad_output, input, weight, mean, var, training,
                                           eps, output_mask, instances=chunk == 1)
    else:
        with torch.no_grad():
            grads = normalize.batch_norm_backward(
                kernels.primitives(input), grad_output, input, weight, bias, mean, var,
                renorm_r, renorm_d, training, eps, axis, chunk, activation, activation_param,
                output_mask)[:3]
    return tuple(_or_empty(g, input) for g in grads)


def _batch_norm_add(input, residual, weight, bias, running_mean, running_var,
                    num_batches_tracked, training, momentum, eps, axis=1, chunk=0,
                    activation="identity", activation_param=0.0):
    _check_sizes("batch_norm_add", input.shape[axis], weight=weight, bias=bias,
                 running_mean=running_mean, running_var=running_var)
    with torch.no_grad():
        outputs = normalize.batch_norm_forward(
            kernels.primitives(input), input, weight, bias, running_mean, running_var,
            training, eps, axis, chunk, activation, activation_param, None, None, None,
            residual=residual)[:3]
    if training and running_mean is not None:
        follow_batch(input.shape, axis, chunk, *outputs[1:], running_mean, running_var,
                     num_batches_tracked, momentum, None, None, 0.0)
    return outputs


def _batch_norm_add_backward(grad_output, input, residual, weight, bias, mean, var, training,
                             eps, axis, chunk, activation, activation_param, output_mask):
    _check_batch_norm_backward("batch_norm_add_backward", grad_output, input, weight, bias,
                               training, axis, chunk, mean=mean, var=var)
    empty = mean.new_empty((0,))
    with torch.no_grad():
        grads = normalize.batch_norm_backward(
            kernels.primitives(input), grad_output, input, weight, bias, mean, var, empty,
            empty, training, eps, axis, chunk, activation, activation_param, output_mask,
            residual=residual)
    return tuple(_or_empty(g, input) for g in grads)


def _group_norm(input, weight, bias, num_groups, eps):
    _check_sizes("group_norm", input.shape[1], weight=weight, bias=bias)
    if native.handles(input, weight, bias, channels_last=False):
        return native.group_norm(input, weight, bias, num_groups, eps)
    with torch.no_grad():
        return normalize.group_norm_forward(kernels.primitives(input), input, weight, bias,
                                            num_groups, eps)


def _group_norm_backward(grad_output, input, weight, bias, mean, invstd, num_groups,
                         output_mask):
    _check_grad_shape("group_norm_backward", grad_output, input)
    _check_sizes("group_norm_backward", input.shape[1], weight=weight, bias=bias)
    _check_sizes("group_norm_backward", input.shape[0] * num_groups, mean=mean, invstd=invstd)
    if native.handles(input, weight, bias, channels_last=False):
        grads = native.group_norm_backward(grad_output, input, weight, mean, invstd,
                                           num_groups, output_mask)
    else:
        with torch.no_grad():
            grads = normalize.group_norm_backward(kernels.primitives(input), grad_output,
                                                  input, weight, bias, mean, invstd,
                                                  num_groups, output_mask)
    return tuple(_or_empty(g, input) for g in grads)


def _layer_norm(input, normalized_ndim, weight, bias, eps):
    _check_sizes("layer_norm", input.shape[input.dim() - normalized_ndim:].numel(),
                 weight=weight, bias=bias)
    if native.handles(input, weight, bias, channels_last=False):
        return native.layer_norm(input, normalized_ndim, weight, bias, eps)
    with torch.no_grad():
        return normalize.layer_norm_forward(kernels.primitives(input), input, normalized_ndim,
                                            weight, bias, eps)


def _layer_norm_backward(grad_output, input, normalized_ndim, weight, bias, mean, invstd,
                         output_mask):
    _check_grad_shape("layer_norm_backward", grad_output, input)
    split = input.dim() - normalized_ndim
    _check_sizes("layer_norm_backward", input.shape[split:].numel(), weight=weight, bias=bias)
    _check_sizes("layer_norm_backward", input.shape[:split].numel(), mean=mean, invstd=invstd)
    if native.handles(input, weight, bias, channels_last=False):
        grads = native.layer_norm_backward(grad_output, input, normalized_ndim, weight, bias,
                                           mean, invstd, output_mask)
    else:
        with torch.no_grad():
            grads = normalize.layer_norm_backward(kernels.primitives(input), grad_output,
                                                  input, normalized_ndim, weight, bias, mean,
                                                  invstd, output_mask)
    return tuple(_or_empty(g, input) for g in grads)


for _name, _impl in (("batch_norm", _batch_norm), ("batch_norm_backward", _batch_norm_backward),
                     ("batch_norm_add", _batch_norm_add),
                     ("batch_norm_add_backward", _batch_norm_add_backward),
                     ("group_norm", _group_norm), ("group_norm_backward", _group_norm_backward),
                     ("layer_norm", _layer_norm), ("layer_norm_backward", _layer_norm_backward)):
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")


# Fake kernels: shapes, dtypes and memory order of the outputs, without data.

def _like_output(input: Tensor, axis: int) -> Tensor:
    """The output's memory order follows the kernels' view of the input."""
    if layout.is_channels_last(input, axis):
        return torch.empty_like(input)
    return input.new_empty(input.shape)


def _fake_grads(input, weight, bias, output_mask, axis):
    return (_like_output(input, axis) if output_mask[0] else input.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] and weight is not None
            else input.new_empty((0,)),
            bias.new_empty(bias.shape) if output_mask[2] and bias is not None
            else input.new_empty((0,)))


def _chunks(input: Tensor, training: bool, chunk: int) -> int:
    """The rows of the per-(chunk, channel) statistics tables: one per ghost batch."""
    if training and chunk and input.numel() != 0:
        return (input.shape[0] + chunk - 1) // chunk
    return 1


def _fake_stat(input: Tensor, training: bool, axis: int, chunk: int) -> Tensor:
    """A per-(chunk, channel) statistics table."""
    return input.new_empty((_chunks(input, training, chunk), input.shape[axis]),
                           dtype=accumulation_dtype(input.dtype))


@torch.library.register_fake("batchnorm::batch_norm")
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
      eps, axis=1, chunk=0, activation="identity", activation_param=0.0, renorm_clipping=None,
      renorm_mean=None, renorm_var=None, renorm_momentum=0.1):
    stat = _fake_stat(input, training, axis, chunk)
    renorm = training and renorm_clipping is not None
    rd_shape = stat.shape if renorm else (0,)
    return (_like_output(input, axis), stat, torch.empty_like(stat),
            stat.new_empty(rd_shape), stat.new_empty(rd_shape))


@torch.library.register_fake("batchnorm::batch_norm_backward")
def _(grad_output, input, weight, bias, mean, var, renorm_r, renorm_d, training, eps, axis,
      chunk, activation, activation_param, output_mask):
    return _fake_grads(input, weight, bias, output_mask, axis)


@torch.library.register_fake("batchnorm::batch_norm_add")
def _(input, residual, weight, bias, running_mean, running_var, num_batches_tracked, training,
      momentum, eps, axis=1, chunk=0, activation="identity", activation_param=0.0):
    stat = _fake_stat(input, training, axis, chunk)
    return _like_output(input, axis), stat, torch.empty_like(stat)


@torch.library.register_fake("batchnorm::batch_norm_add_backward")
def _(grad_output, input, residual, weight, bias, mean, var, training, eps, axis, chunk,
      activation, activation_param, output_mask):
    return (*_fake_grads(input, weight, bias, output_mask, axis),
            _like_output(input, axis) if output_mask[3] else input.new_empty((0,)))


@torch.library.register_fake("batchnorm::group_norm")
def _(input, weight, bias, num_groups, eps):
    stat = input.new_empty((input.shape[0], num_groups),
                           dtype=accumulation_dtype(input.dtype))
    return _like_output(input, 1), stat, torch.empty_like(stat)


@torch.library.register_fake("batchnorm::group_norm_backward")
def _(grad_output, input, weight, bias, mean, invstd, num_groups, output_mask):
    return _fake_grads(input, weight, bias, output_mask, 1)


@torch.library.register_fake("batchnorm::layer_norm")
def _(input, normalized_ndim, weight, bias, eps):
    rows = 1
    for size in input.shape[:input.dim() - normalized_ndim]:
        rows = rows * size
    stat = input.new_empty((rows,), dtype=accumulation_dtype(input.dtype))
    return input.new_empty(input.shape), stat, torch.empty_like(stat)


@torch.library.register_fake("batchnorm::layer_norm_backward")
def _(grad_output, input, normalized_ndim, weight, bias, mean, invstd, output_mask):
    grads = _fake_grads(input, weight, bias, output_mask, 1)
    return (input.new_empty(input.shape) if output_mask[0] else grads[0], *grads[1:])


# Autograd formulas: the backward operators; double backward differentiates the core on
# the reference primitives.

def _grads_or_none(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


# Differentiable backward (create_graph=True): the core on the reference primitives,
# differentiated by autograd, registered as CompositeImplicitAutograd so that autograd
# records the ops it runs. Saved statistics are recomputed from the input (they depend on
# it); Batch Renormalization's r and d are constants, replayed.

def _second_order(forward, grad_output, tensors, output_mask):
    """``vjp(forward)(grad_output)`` for the masked ``tensors``, itself differentiable."""
    wanted = [t for t, need in zip(tensors, output_mask, strict=True)
              if need and t is not None]
    grads = iter(torch.autograd.grad(forward(), wanted, grad_output, create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return tuple(next(grads) if need and t is not None else tensors[0].new_empty((0,))
                 for t, need in zip(tensors, output_mask, strict=True))


def _batch_norm_backward_differentiable(grad_output, input, weight, bias, mean, var, renorm_r,
                                        renorm_d, training, eps, axis, chunk, activation,
                                        activation_param, output_mask):
    return _second_order(lambda: normalize.batch_norm_forward(
        reference, input, weight, bias, mean.view(-1), var.view(-1), training, eps, axis,
        chunk, activation, activation_param, None, None, None, check=False,
        renorm_rd=(renorm_r, renorm_d) if renorm_r.numel() else None)[0],
        grad_output, (input, weight, bias), output_mask)


def _batch_norm_add_backward_differentiable(grad_output, input, residual, weight, bias, mean,
                                            var, training, eps, axis, chunk, activation,
                                            activation_param, output_mask):
    return _second_order(lambda: normalize.batch_norm_forward(
        reference, input, weight, bias, mean.view(-1), var.view(-1), training, eps, axis,
        chunk, activation, activation_param, None, None, None, check=False,
        residual=residual)[0], grad_output, (input, weight, bias, residual), output_mask)


def _group_norm_backward_differentiable(grad_output, input, weight, bias, mean, invstd,
                                        num_groups, eps, output_mask):
    return _second_order(lambda: normalize.group_norm_forward(
        reference, input, weight, bias, num_groups, eps, check=False)[0], grad_output,
        (input, weight, bias), output_mask)


def _layer_norm_backward_differentiable(grad_output, input, normalized_ndim, weight, bias,
                                        eps, output_mask):
    return _second_order(lambda: normalize.layer_norm_forward(
        reference, input, normalized_ndim, weight, bias, eps, check=False)[0], grad_output,
        (input, weight, bias), output_mask)


for _name, _impl in (("batch_norm_backward_differentiable", _batch_norm_backward_differentiable),
                     ("batch_norm_add_backward_differentiable",
                      _batch_norm_add_backward_differentiable),
                     ("group_norm_backward_differentiable", _group_norm_backward_differentiable),
                     ("layer_norm_backward_differentiable", _layer_norm_backward_differentiable)):
    _lib.impl(_name, _impl, "CompositeImplicitAutograd")


# Autograd formulas: the backward operators, or their differentiable twins when the
# backward itself is being differentiated.

def _setup_batch_norm(ctx, inputs, output):
    (input, weight, bias, _, _, _, training, _, eps, axis, chunk, activation,
     activation_param, *_) = inputs
    _, mean, var, r, d = output
    ctx.mark_non_differentiable(mean, var, r, d)
    ctx.save_for_backward(input, weight, bias, mean, var, r, d)
    ctx.options = (training, eps, axis, chunk, activation, activation_param)


def _backward_batch_norm(ctx, grad_output, *_):
    input, weight, bias, mean, var, r, d = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    backward = (torch.ops.batchnorm.batch_norm_backward_differentiable
                if torch.is_grad_enabled() else torch.ops.batchnorm.batch_norm_backward)
    grads = backward.default(grad_output, input, weight, bias, mean, var, r, d, *ctx.options,
                             needs)
    return _grads_or_none(grads, needs)


def _setup_batch_norm_add(ctx, inputs, output):
    (input, residual, weight, bias, _, _, _, training, _, eps, axis, chunk, activation,
     activation_param) = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(input, residual, weight, bias, mean, var)
    ctx.options = (training, eps, axis, chunk, activation, activation_param)


def _backward_batch_norm_add(ctx, grad_output, *_):
    input, residual, weight, bias, mean, var = ctx.saved_tensors
    needs = [*ctx.needs_input_grad[:1], *ctx.needs_input_grad[2:4], ctx.needs_input_grad[1]]
    backward = (torch.ops.batchnorm.batch_norm_add_backward_differentiable
                if torch.is_grad_enabled() else torch.ops.batchnorm.batch_norm_add_backward)
    grad_input, grad_weight, grad_bias, grad_residual = _grads_or_none(
        backward.default(grad_output, input, residual, weight, bias, mean, var, *ctx.options,
                         needs), needs)
    return grad_input, grad_residual, grad_weight, grad_bias


def _setup_group_norm(ctx, inputs, output):
    input, weight, bias, num_groups, eps = inputs
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.options = (num_groups, eps)


def _backward_group_norm(ctx, grad_output, *_):
    input, weight, bias, mean, invstd = ctx.saved_tensors
    num_groups, eps = ctx.options
    needs = list(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():
        grads = torch.ops.batchnorm.group_norm_backward_differentiable.default(
            grad_output, input, weight, bias, mean, invstd, num_groups, eps, needs)
    else:
        grads = torch.ops.batchnorm.group_norm_backward.default(
            grad_output, input, weight, bias, mean, invstd, num_groups, needs)
    return _grads_or_none(grads, needs)


def _setup_layer_norm(ctx, inputs, output):
    input, normalized_ndim, weight, bias, eps = inputs
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.options = (normalized_ndim, eps)


def _backward_layer_norm(ctx, grad_output, *_):
    input, weight, bias, mean, invstd = ctx.saved_tensors
    normalized_ndim, eps = ctx.options
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    if torch.is_grad_enabled():
        grads = torch.ops.batchnorm.layer_norm_backward_differentiable.default(
            grad_output, input, normalized_ndim, weight, bias, eps, needs)
    else:
        grads = torch.ops.batchnorm.layer_norm_backward.default(
            grad_output, input, normalized_ndim, weight, bias, mean, invstd, needs)
    grads = _grads_or_none(grads, needs)
    return grads[0], None, grads[1], grads[2]


def _register_autograd(name: str, backward, setup_context) -> None:
    """What ``torch.library.register_autograd`` registers (an Autograd kernel: an
    autograd.Function around the call below autograd), with the arguments the dispatcher
    drops for equalling their defaults filled from a table read once: torch's version
    re-reads the schema per argument on every call, ~100 us for batch_norm's 17 arguments
    on the 2-core machine, which the CUDA and composite paths paid per layer call."""
    op = getattr(torch.ops.batchnorm, name).default
    defaults = tuple(argument.default_value for argument in op._schema.arguments)
    below = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        *args, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & below, *args)
        setup_context(ctx, args, output)
        return output

    def backward_with_keyset(ctx, *grads):  # None for the arguments after the last gradient
        grads = backward(ctx, *grads)
        return (*grads, *(None,) * (len(defaults) + 1 - len(grads)))

    # named as the C++ CPU nodes are: BatchNorm -> "BatchNormBackward" in grad_fn.name()
    node = type(name.title().replace("_", ""), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)})

    def autograd_kernel(keyset, *args):
        args = (*args, *defaults[len(args):])
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return node.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


_register_autograd("batch_norm", _backward_batch_norm, _setup_batch_norm)
_register_autograd("batch_norm_add", _backward_batch_norm_add, _setup_batch_norm_add)
_register_autograd("group_norm", _backward_group_norm, _setup_group_norm)
_register_autograd("layer_norm", _backward_layer_norm, _setup_layer_norm)

batch_norm = torch.ops.batchnorm.batch_norm.default
batch_norm_add = torch.ops.batchnorm.batch_norm_add.default
group_norm = torch.ops.batchnorm.group_norm.default
layer_norm = torch.ops.batchnorm.layer_norm.default


def normalized(name: str, *args: object) -> Tensor:
    """The normalized output (the first) of operator ``name`` called with ``args``: in eager
    mode through the compiled library's direct binding (:func:`extension.bindings`), which
    skips the generic torch.ops argument conversion; under ``torch.compile`` (which must see
    the torch.ops object) or with a ``__torch_function__`` override among the arguments (FX
    proxies, tensor subclasses, function modes), and before the library loads, through
    torch.ops."""
    if not torch.compiler.is_compiling():
        direct = extension.bindings()
        if direct is not None and not torch._C._has_torch_function(args):
            return getattr(direct, name)(*args)
    return getattr(torch.ops.batchnorm, name).default(*args)[0]

# The compiled CPU and AutogradCPU implementations (batchnorm/csrc) register when their
# library loads: here if the cache holds a build of the current sources, else at the first
# CPU call, whose composite builds the kernels (kernels.primitives), so importing never
# compiles. A backend forced at import other than cpp leaves them unloaded.
if kernels.forced_backend() in (None, "cpp"):
    extension.load_cached()
