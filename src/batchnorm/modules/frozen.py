"""Frozen BatchNorm: fixed statistics and affine, no updates, a one-multiply backward.

Fine-tuning with small batches (detection and segmentation backbones) usually freezes BN
entirely. ``requires_grad=False`` on a BatchNorm's weight and bias does not: in train mode
the layer still normalizes with batch statistics and updates its running ones. A frozen
layer holds weight, bias and the running statistics as buffers and computes, in any mode,

    y = act(x * scale + shift),  scale = weight / sqrt(running_var + eps),
                                 shift = bias - running_mean * scale

so its backward is ``dx = dy * act' * scale`` and nothing else. :func:`freeze` and
:func:`unfreeze` swap layers in a model, recursively, keeping the values and the mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.core.activation import default_param, make_activation
from batchnorm.modules.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules.convert import _swap

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
           "freeze", "unfreeze"]

_STATE = ("weight", "bias", "running_mean", "running_var")
def _activate(z: Tensor, name: str, param: float) -> Tensor:
    """torch.nn.functional's activation ``name`` (TorchScript-compatible)."""
    if name == "relu":
        return TF.relu(z)
    if name == "relu6":
        return TF.relu6(z)
    if name == "leaky_relu":
        return TF.leaky_relu(z, param)
    if name == "elu":
        return TF.elu(z, param)
    if name == "silu":
        return TF.silu(z)
    return z


class FrozenBatchNorm(nn.Module):
    """Batch normalization of channel ``axis`` with fixed statistics and affine.

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (a plain BatchNorm's
    state_dict loads; its ``num_batches_tracked`` is ignored). Optional fused activation as
    on :class:`batchnorm.BatchNorm2d`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, axis: int = 1,
                 activation: str | None = None, activation_param: float | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        make_activation(activation, activation_param)
        self.num_features, self.eps, self.axis = num_features, eps, axis
        self.activation, self.activation_param = activation, activation_param
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        if not -input.dim() <= self.axis < input.dim() or input.dim() < 2:
            raise ValueError(f"expected at least {max(2, self.axis + 1, -self.axis)}D input "
                             f"for axis={self.axis} (got {input.dim()}D input)")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[self.axis] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels on axis "
                             f"{self.axis}, got input of size {list(input.shape)}")
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = [1] * input.dim()
        shape[self.axis] = self.num_features
        z = input * scale.view(shape).to(input.dtype) + shift.view(shape).to(input.dtype)
        activation = "identity" if self.activation is None else self.activation
        param = self.activation_param
        return _activate(z, activation, default_param(activation) if param is None else param)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if type(self) is FrozenBatchNorm:
            text += f", axis={self.axis}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.activation_param is not None:
            text += f", activation_param={self.activation_param}"
        return text


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm1d`: (N, C) or (N, C, L) input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm2d`: (N, C, H, W) input, NCHW or channels_last."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen :class:`torch.nn.BatchNorm3d`: (N, C, D, H, W) input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


_FROZEN_OF = ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d),
              (nn.BatchNorm3d, FrozenBatchNorm3d))
_PLAIN_OF = {FrozenBatchNorm1d: BatchNorm1d, FrozenBatchNorm2d: BatchNorm2d,
             FrozenBatchNorm3d: BatchNorm3d}


def _frozen(layer: _BatchNorm, name: str) -> FrozenBatchNorm:
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(f"freeze: '{name}' is an uninitialized {type(layer).__name__}; "
                         "expected a layer that has seen input (run one forward first)")
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError(f"freeze: '{name}' ({type(layer).__name__}) has "
                         "track_running_stats=False; expected running statistics to freeze")
    cls = next((frozen for plain, frozen in _FROZEN_OF if isinstance(layer, plain)),
               FrozenBatchNorm)
    options = {"axis": getattr(layer, "axis", 1)} if cls is FrozenBatchNorm else {}
    frozen = cls(layer.num_features, layer.eps, activation=getattr(layer, "activation", None),
                 activation_param=getattr(layer, "activation_param", None),
                 device=layer.running_mean.device, dtype=layer.running_mean.dtype, **options)
    with torch.no_grad():
        for state in _STATE:
            value = getattr(layer, state)
            if value is not None:
                getattr(frozen, state).copy_(value)
    # What unfreeze needs besides the frozen values: the layer without them (class,
    # options, hooks, num_batches_tracked), its four tensors kept on the meta device
    # for their kind and requires_grad only.
    template = _swap(layer, type(layer))
    for state in _STATE:
        value = getattr(layer, state)
        if state in template._parameters and value is not None:
            template._parameters[state] = nn.Parameter(value.detach().to("meta"),
                                                       value.requires_grad)
        elif value is not None:
            template._buffers[state] = value.to("meta")
    for key, buffer in template._buffers.items():
        if key not in _STATE and buffer is not None:
            template._buffers[key] = buffer.clone()
    frozen.__dict__["_unfrozen_template"] = template
    return frozen.train(layer.training)


def _unfrozen(frozen: FrozenBatchNorm) -> nn.Module:
    template = frozen.__dict__.get("_unfrozen_template")
    if template is None:
        cls = _PLAIN_OF.get(type(frozen), BatchNorm)
        options = {"axis": frozen.axis} if cls is BatchNorm else {}
        layer = cls(frozen.num_features, frozen.eps, activation=frozen.activation,
                    activation_param=frozen.activation_param, device=frozen.weight.device,
                    dtype=frozen.weight.dtype, **options)
    else:
        layer = _swap(template, type(template))
        for key, buffer in layer._buffers.items():
            if key not in _STATE and buffer is not None:
                layer._buffers[key] = buffer.to(frozen.running_mean.device, copy=True)
    for state in _STATE:
        value = getattr(frozen, state).detach().clone()
        if state in layer._parameters and layer._parameters[state] is not None:
            layer._parameters[state] = nn.Parameter(value,
                                                    layer._parameters[state].requires_grad)
        elif layer._buffers.get(state) is not None:
            layer._buffers[state] = value
    return layer.train(frozen.training)


def _replace(module: nn.Module, swap: Any, name: str) -> nn.Module:
    replaced = swap(module, name)
    if replaced is not None:
        return replaced
    for child_name, child in module.named_children():
        replacement = _replace(child, swap, f"{name}.{child_name}" if name else child_name)
        if replacement is not child:
            setattr(module, child_name, replacement)
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` (torch.nn's, ours, SyncBatchNorm) by a
    :class:`FrozenBatchNorm1d`/``2d``/``3d`` (or :class:`FrozenBatchNorm` for other ranks),
    in place, with a copy of its values and its train/eval mode; :func:`unfreeze` restores
    the original class and options. Returns the module (a new object only when it is
    itself a BatchNorm)."""
    return _replace(module, lambda layer, name: _frozen(layer, name or "module")
                    if isinstance(layer, _BatchNorm) else None, "")


def unfreeze(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze`, in place: each frozen layer becomes the layer it was frozen
    from (class, options, hooks, num_batches_tracked), with the frozen values and mode; a
    frozen layer built directly becomes :class:`batchnorm.BatchNorm2d` and kin."""
    return _replace(module, lambda layer, name: _unfrozen(layer)
                    if isinstance(layer, FrozenBatchNorm) else None, "")
