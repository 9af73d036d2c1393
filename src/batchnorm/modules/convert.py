"""Swap torch.nn normalization layers for ours in a model, and back.

The swapped layer shares the original's parameters and buffers (same tensors, so an
optimizer built before the swap keeps working) and its train/eval mode and hooks.

torch.nn's exact classes map by class. A subclass from elsewhere converts only when it
has a faithful equivalent, recognized by its class name and attributes and then confirmed
by running both on a probe input in training and eval mode:

* timm's ``BatchNormAct2d`` (BatchNorm2d, then ``drop``, then ``act``) with no drop layer
  and a ReLU/ReLU6/LeakyReLU/ELU/SiLU/Identity ``act`` -> :class:`BatchNorm2d` with that fused
  activation;
* timm's and torchvision's ``LayerNorm2d`` (LayerNorm over the channels of NCHW input) ->
  :class:`batchnorm.modules.layernorm2d.LayerNorm2d`.

Every other normalization layer is left as it is and named, with the reason, in a warning.

``convert(model, fuse_activations=True)`` also fuses each BatchNorm that an
``nn.Sequential`` runs straight into a ReLU/ReLU6/LeakyReLU/ELU/SiLU: the layer computes
the activation and the activation's place holds an ``nn.Identity``, as
``torch.ao.quantization.fuse_modules`` leaves it. Opt-in because it changes what a hook on
the BatchNorm, or a feature extractor reading its output, sees; pairs where either module
has hooks stay apart. :func:`revert` puts the activation back.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from batchnorm.core.activation import make_activation
from batchnorm.modules import batchnorm, instancenorm, normalization
from batchnorm.modules.layernorm2d import LayerNorm2d

_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    getattr(nn, name): getattr(module, name)
    for module in (batchnorm, instancenorm, normalization)
    for name in module.__all__ if hasattr(nn, name)
}
_OURS_TO_TORCH = {ours: torch_cls for torch_cls, ours in _TORCH_TO_OURS.items()}
_TORCH_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)
_OURS = (batchnorm._BatchNormForward, instancenorm._InstanceNormForward,
         normalization.GroupNorm, normalization.LayerNorm)
# Fused activation name -> (torch.nn module, the attribute holding its parameter)
_ACTIVATION_MODULES: dict[str, tuple[type[nn.Module], str | None]] = {
    "relu": (nn.ReLU, None), "relu6": (nn.ReLU6, None), "silu": (nn.SiLU, None),
    "leaky_relu": (nn.LeakyReLU, "negative_slope"), "elu": (nn.ELU, "alpha")}
_ORIGIN = "_reverts_to"  # (class, children) of a converted ecosystem layer
_FUSED = "_fused_from"  # the activation module a fused BatchNorm replaced in its Sequential
_PROBE_TOLERANCE = 1e-6  # float64 probe: exact equivalents agree to rounding

__all__ = ["activation_module", "convert", "revert"]


def activation_module(activation: str | None, activation_param: float | None = None
                      ) -> nn.Module | None:
    """The torch.nn module computing a fused activation (None for no activation)."""
    checked = make_activation(activation, activation_param)
    if checked.is_identity:
        return None
    cls, attribute = _ACTIVATION_MODULES[checked.name]
    return cls() if attribute is None else cls(checked.param)


def _fused_options(act: object) -> dict[str, Any] | None:
    """The fused activation options computing the module ``act``, None if there are none."""
    if type(act) is nn.Identity:
        return {"activation": None, "activation_param": None}
    for name, (cls, attribute) in _ACTIVATION_MODULES.items():
        if type(act) is cls:
            param = None if attribute is None else float(getattr(act, attribute))
            return {"activation": name, "activation_param": param}
    return None


def _rebuild_lazy(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A lazy layer that has not seen input owns no tensors yet: build a fresh one (its
    lazy hooks are bound to the old instance, so sharing them would initialize that)."""
    new = cls(eps=module.eps, momentum=module.momentum, affine=module.affine,
              track_running_stats=module.track_running_stats, bias=module.bias is not None)
    return new.train(module.training)


def _swap(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
            module.has_uninitialized_params():
        return _rebuild_lazy(module, cls)
    new = cls.__new__(cls)
    # Same parameter/buffer tensors and attributes; containers copied so that later
    # registrations on one module do not leak into the other.
    new.__dict__.update({key: value.copy() if isinstance(value, dict) else value
                         for key, value in module.__dict__.items()})
    return new


def _norm_act_equivalent(module: nn.Module) -> nn.Module | str:
    """timm's BatchNormAct2d -> our BatchNorm2d with the fused activation, or why not."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if not isinstance(drop, nn.Module) or not isinstance(act, nn.Module):
        return "expected `drop` and `act` modules"
    if type(drop) is not nn.Identity:
        return f"its drop layer {type(drop).__name__} has no fused equivalent"
    options = _fused_options(act)
    if options is None:
        return (f"its activation {type(act).__name__} has no fused equivalent (expected "
                f"one of {', '.join(cls.__name__ for cls, _ in _ACTIVATION_MODULES.values())}"
                " or Identity)")
    new = _swap(module, batchnorm.BatchNorm2d)
    del new._modules["drop"], new._modules["act"]
    new.__dict__.update(options)
    return new


def _layer_norm_2d_equivalent(module: nn.Module) -> nn.Module | str:
    """timm's / torchvision's LayerNorm2d -> our LayerNorm2d, or why not."""
    if len(module.normalized_shape) != 1:
        return (f"expected normalized_shape of one channel dim, got "
                f"{list(module.normalized_shape)}")
    return _swap(module, LayerNorm2d)


# (class name, torch.nn base) -> recognizer of the ecosystem layer of that shape
_ECOSYSTEM = {("BatchNormAct2d", nn.BatchNorm2d): _norm_act_equivalent,
              ("LayerNorm2d", nn.LayerNorm): _layer_norm_2d_equivalent}


def _probe_difference(original: nn.Module, candidate: nn.Module) -> str | None:
    """Why ``candidate`` does not compute what ``original`` does on a float64 probe
    (training output and buffers, then eval output), or None when it does."""
    tensors = [*original.parameters(), *original.buffers()]
    if any(is_lazy(tensor) or tensor.is_meta for tensor in tensors):
        return "its tensors are not materialized, so its forward cannot be probed"
    channels = getattr(original, "num_features", None) or original.normalized_shape[0]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, channels, 3, 5, generator=generator, dtype=torch.float64) * 2 + 0.5
    probe = probe.to(tensors[0].device if tensors else "cpu")
    for training in (True, False):
        mode = "training" if training else "eval"
        expected_layer = copy.deepcopy(original).double().train(training)
        got_layer = copy.deepcopy(candidate).double().train(training)
        try:
            with torch.no_grad():
                pairs = [(got_layer(probe), expected_layer(probe))]
        except Exception as error:  # a lookalike may reject the probe in any way
            return f"its {mode} forward or ours failed on a probe ({error})"
        got_state = got_layer.state_dict()
        pairs += [(got_state.get(key), value) for key, value in
                  expected_layer.state_dict().items()]
        for got, expected in pairs:
            if got is None or got.shape != expected.shape:
                return f"its {mode} state differs from ours on a probe"
            difference = (got.double() - expected.double()).abs().max().item() \
                if got.numel() else 0.0
            if not difference <= _PROBE_TOLERANCE:
                return f"its {mode} forward differs from ours by {difference:.3g} on a probe"
    return None


def ecosystem_equivalent(module: nn.Module) -> nn.Module | str:
    """Our layer computing what the torch.nn norm subclass ``module`` computes, sharing its
    tensors, or the reason there is none (see the module docstring)."""
    recognize = next((recognize for (name, base), recognize in _ECOSYSTEM.items()
                      if type(module).__name__ == name and isinstance(module, base)), None)
    if recognize is None:
        if isinstance(module, nn.SyncBatchNorm):
            return "use batchnorm.convert_sync_batchnorm for synchronized BatchNorm"
        base = next(cls for cls in type(module).__mro__ if cls.__module__.startswith("torch.nn"))
        return f"a subclass of {base.__name__} whose forward convert does not know"
    candidate = recognize(module)
    if isinstance(candidate, str):
        return candidate
    difference = _probe_difference(module, candidate)
    if difference is not None:
        return difference
    candidate.__dict__[_ORIGIN] = (type(module), dict(module.named_children()))
    return candidate


def _convert_one(module: nn.Module) -> nn.Module | str | None:
    """Our replacement of ``module``, why it has none, or None when it is no norm layer
    (or already ours)."""
    cls = _TORCH_TO_OURS.get(type(module))
    if cls is not None:
        return _swap(module, cls)
    if isinstance(module, _OURS) or not isinstance(module, _TORCH_NORMS):
        return None
    return ecosystem_equivalent(module)


def _revert_one(module: nn.Module) -> nn.Module | str | None:
    """The torch.nn (or original ecosystem) layer computing ``module``, why there is none,
    or None when it is not one of our layers."""
    origin = module.__dict__.get(_ORIGIN)
    if origin is not None:
        cls, children = origin
        original = _swap(module, cls)
        for attribute in (_ORIGIN, "activation", "activation_param"):
            original.__dict__.pop(attribute, None)
        original._modules.update(children)
        return original
    cls = _OURS_TO_TORCH.get(type(module))
    if cls is None:
        if isinstance(module, _OURS):
            return f"torch.nn has no equivalent of {type(module).__name__}"
        return None
    layer = _swap(module, cls)
    activation = activation_module(getattr(module, "activation", None),
                                   getattr(module, "activation_param", None))
    if activation is None:
        return layer
    layer.__dict__.pop("activation", None)  # now the module after it, not an attribute
    layer.__dict__.pop("activation_param", None)
    return nn.Sequential(layer, activation).train(module.training)


def _replace(module: nn.Module, swap: Any, name: str, left: list[str]) -> nn.Module:
    replacement = swap(module)
    if isinstance(replacement, nn.Module):
        return replacement
    if isinstance(replacement, str):
        left.append(f"{name or '<root>'!r} ({type(module).__name__}): {replacement}")
        return module
    for child_name, child in module.named_children():
        new = _replace(child, swap, f"{name}.{child_name}" if name else child_name, left)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _swap_all(module: nn.Module, swap: Any, what: str) -> nn.Module:
    left: list[str] = []
    module = _replace(module, swap, "", left)
    if left:
        warnings.warn(f"{what}: left {len(left)} normalization layer(s) as they are: "
                      + "; ".join(left), stacklevel=3)
    return module


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, hooks) for hooks in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _sequential_pairs(module: nn.Module) -> Iterator[tuple[dict[str, Any], str, str]]:
    """``(children, name, next_name)`` for each pair of adjacent children of every
    Sequential in ``module`` (``children`` is its ``_modules``: assign to replace one)."""
    for sequential in module.modules():
        if isinstance(sequential, nn.Sequential):
            for name, next_name in itertools.pairwise(list(sequential._modules)):
                yield sequential._modules, name, next_name


def _fuse_activations(module: nn.Module) -> None:
    """Fuse each of our BatchNorms that a Sequential runs straight into an activation with
    a fused equivalent (see the module docstring)."""
    for children, name, next_name in _sequential_pairs(module):
        layer, act = children[name], children[next_name]
        if not isinstance(layer, batchnorm._BatchNormForward) or layer.activation \
                or type(act) is nn.Identity or _has_hooks(layer) or _has_hooks(act):
            continue
        options = _fused_options(act)
        if options is not None:
            layer.__dict__.update(options)
            layer.__dict__[_FUSED] = act
            children[next_name] = nn.Identity()


def _unfuse_activations(module: nn.Module) -> None:
    """Undo :func:`_fuse_activations` where the Identity still holds the activation's
    place (elsewhere the layer reverts as any fused one does)."""
    for children, name, next_name in _sequential_pairs(module):
        layer = children[name]
        act = layer.__dict__.pop(_FUSED, None)
        if act is not None and type(children[next_name]) is nn.Identity:
            for attribute in ("activation", "activation_param"):  # back to the class's None
                layer.__dict__.pop(attribute)
            children[next_name] = act


def convert(module: nn.Module, *, fuse_activations: bool = False) -> nn.Module:
    """Replace every ``torch.nn`` BatchNorm/InstanceNorm/GroupNorm/LayerNorm (exact
    classes, lazy ones included) and every recognized subclass (see the module docstring)
    in ``module`` by its batchnorm counterpart, in place; warns naming each normalization
    layer left as it is, with the reason. ``fuse_activations`` also fuses BatchNorm ->
    activation pairs of Sequentials into one layer (see the module docstring).

    Returns the module (a new object only when ``module`` itself is a norm layer)."""
    module = _swap_all(module, _convert_one, "convert")
    if fuse_activations:
        _fuse_activations(module)
    return module


def revert(module: nn.Module) -> nn.Module:
    """Undo :func:`convert`, in place: our layers become the ``torch.nn`` classes (or the
    subclass they were converted from) again; warns naming each of ours left as it is.

    A layer with a fused activation becomes ``nn.Sequential(torch_layer, activation)``
    (its state_dict keys gain a ``0.`` level), so that torch's tools that only know
    torch's BatchNorm (``torch.nn.utils.fusion.fuse_conv_bn_eval``, fx's ``fuse``) keep
    the activation: given our layer directly they would drop it. :func:`batchnorm.fold`
    folds our layers and keeps their activation without a revert. Activations that
    ``convert(fuse_activations=True)`` fused go back to their place in the Sequential."""
    _unfuse_activations(module)
    return _swap_all(module, _revert_one, "revert")
