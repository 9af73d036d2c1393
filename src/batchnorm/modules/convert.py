"""Swap torch.nn normalization layers for ours in a model, and back.

The swapped layer shares the original's parameters and buffers (same tensors, so an
optimizer built before the swap keeps working) and its train/eval mode and hooks.
"""

from __future__ import annotations

from torch import nn

from batchnorm.modules import batchnorm, instancenorm, normalization

_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    getattr(nn, name): getattr(module, name)
    for module in (batchnorm, instancenorm, normalization)
    for name in module.__all__ if hasattr(nn, name)
}
_OURS_TO_TORCH = {ours: torch_cls for torch_cls, ours in _TORCH_TO_OURS.items()}

__all__ = ["convert", "revert"]


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


def _replace(module: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    cls = mapping.get(type(module))
    if cls is not None:
        return _swap(module, cls)
    for name, child in module.named_children():
        replacement = _replace(child, mapping)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn`` BatchNorm/InstanceNorm/GroupNorm/LayerNorm (exact
    classes, lazy ones included) in ``module`` by its batchnorm counterpart, in place.

    Returns the module (a new object only when ``module`` itself is a norm layer)."""
    return _replace(module, _TORCH_TO_OURS)


def revert(module: nn.Module) -> nn.Module:
    """Undo :func:`convert`: our layers become the ``torch.nn`` classes again, in place."""
    return _replace(module, _OURS_TO_TORCH)
