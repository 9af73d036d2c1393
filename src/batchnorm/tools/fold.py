"""Fold inference-mode BatchNorm into the conv/linear layer before it.

In eval mode a BatchNorm is the per-channel affine map ``y = z * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``;
when ``z = W x + b`` comes from a conv or linear layer whose output nothing else reads,
the map folds into that layer: ``W' = W * scale`` (per output channel), ``b' = b * scale
+ shift``. The graph is found by torch.fx, so residual branches and functional code are
seen, not only ``nn.Sequential`` neighbours.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.tools.graph import layer_batchnorm_pairs, trace

__all__ = ["fold"]


class _FrozenAffine(nn.Module):
    """``y = x * scale + shift`` per channel ``axis``: an eval-mode BatchNorm that could not
    be folded (its input is shared, or no conv/linear produces it)."""

    def __init__(self, scale: Tensor, shift: Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.axis = axis

    def forward(self, input: Tensor) -> Tensor:
        shape = [1] * input.dim()
        shape[self.axis] = -1
        return input * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, axis={self.axis}"


def _has_running_stats(bn: _BatchNorm) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def _scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as ``(scale, shift)`` in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def _folded(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``layer`` with ``bn`` folded into its weight and bias."""
    scale, shift = _scale_shift(bn)
    weight = layer.weight.double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out / groups, *kernel); output channel g * out/groups + j is
        # column j of group g's block of rows.
        groups, out_per_group = layer.groups, weight.shape[1]
        blocks = weight.view(groups, -1, out_per_group, *weight.shape[2:])
        weight = (blocks * scale.view(groups, 1, out_per_group, *[1] * (weight.dim() - 2))
                  ).view(weight.shape)
    else:  # Conv (out, in / groups, *kernel) and Linear (out, in)
        weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.to(layer.weight.dtype), layer.weight.requires_grad)
    new.bias = nn.Parameter(bias.to(layer.weight.dtype), layer.weight.requires_grad)
    return new


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _freeze_remaining(model: nn.Module) -> None:
    """Every BatchNorm with running statistics left in ``model`` becomes a frozen affine;
    one without them normalizes with batch statistics even in eval, so it stays."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm):
            continue
        if not _has_running_stats(module):
            warnings.warn(f"fold: BatchNorm {name!r} has no running statistics "
                          "(track_running_stats=False), so it uses batch statistics in eval "
                          "and was left in place", stacklevel=3)
            continue
        scale, shift = _scale_shift(module)
        dtype = module.running_mean.dtype
        affine = _FrozenAffine(scale.to(dtype), shift.to(dtype), getattr(module, "axis", 1))
        if name:
            _set_submodule(model, name, affine)


def fold(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every foldable BatchNorm folded into the
    Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped too) or Linear layer feeding it.

    A BatchNorm is folded when its only input is such a layer's output, nothing else reads
    that output and the layer is called once; every other BatchNorm with running
    statistics becomes a frozen per-channel affine, and one without (``track_running_stats
    =False``) is left in place with a warning. ``model`` is not modified; the result is in
    eval mode, a ``torch.fx.GraphModule`` when the model can be traced (else, with a
    warning, a copy whose BatchNorms are only frozen). Assumes batched input: a Linear's
    BatchNorm normalizes its last dim."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    if isinstance(model, _BatchNorm):
        raise ValueError("fold: model is a single BatchNorm layer; there is nothing to fold "
                         "it into")
    try:
        graph_module = trace(model)
    except Exception as error:  # fx raises many types on untraceable Python
        warnings.warn(f"fold: could not trace the model with torch.fx ({error}); no "
                      "BatchNorm was folded, they are replaced by frozen affines",
                      stacklevel=2)
        _freeze_remaining(model)
        return model
    modules = dict(graph_module.named_modules())
    for pair in layer_batchnorm_pairs(graph_module):
        bn = modules[pair.bn_name]
        if not pair.exclusive or not _has_running_stats(bn):
            continue
        _set_submodule(graph_module, pair.layer_name, _folded(modules[pair.layer_name], bn))
        pair.bn_node.replace_all_uses_with(pair.layer_node)
        graph_module.graph.erase_node(pair.bn_node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    _freeze_remaining(graph_module)
    return graph_module.eval()
