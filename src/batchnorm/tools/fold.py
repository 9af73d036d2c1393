"""Fold inference-mode BatchNorm into the conv/linear layer before it.

In eval mode a BatchNorm is the per-channel affine map ``y = z * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``;
when ``z = W x + b`` comes from a conv or linear layer whose output nothing else reads,
the map folds into that layer: ``W' = W * scale`` (per output channel), ``b' = b * scale
+ shift``. The graph is found by torch.fx, so residual branches and functional code are
seen, not only ``nn.Sequential`` neighbours. Only BatchNorms whose forward is known are
touched (torch's exact classes, ours with their fused activation kept as a module after
the layer, subclasses :func:`batchnorm.convert` recognizes such as timm's
``BatchNormAct2d``); any other subclass may compute more than the map and is left as it
is, with a warning. (torch's ``fuse_conv_bn_eval`` knows only torch's BatchNorm: given
one of ours it drops the fused activation.)
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from batchnorm.modules.convert import activation_module, ecosystem_equivalent
from batchnorm.modules.frozen import freeze
from batchnorm.tools.graph import BATCHNORMS, is_known_batchnorm, layer_batchnorm_pairs, trace

__all__ = ["fold"]


def _has_running_stats(bn: nn.Module) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def _scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm (or FrozenBatchNorm) as ``(scale, shift)`` in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` with ``bn``'s affine map folded into its weight and bias."""
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


def _fused_activation(bn: nn.Module) -> nn.Module | None:
    """The activation a BatchNorm applies after its affine map, as a torch.nn module."""
    return activation_module(getattr(bn, "activation", None),
                             getattr(bn, "activation_param", None))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _replace_unknown(model: nn.Module) -> None:
    """BatchNorm subclasses: recognized ones become our equivalent layer, the others stay
    as they are (fold cannot know what their forward computes), named in a warning."""
    left = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm) or is_known_batchnorm(module):
            continue
        equivalent = ecosystem_equivalent(module)
        if isinstance(equivalent, nn.Module):
            _set_submodule(model, name, equivalent)
        else:
            left.append(f"{name!r} ({type(module).__name__}): {equivalent}")
    if left:
        warnings.warn(f"fold: left {len(left)} BatchNorm layer(s) as they are, their forward "
                      "being one fold does not know: " + "; ".join(left), stacklevel=3)


def _freeze_remaining(model: nn.Module) -> None:
    """Every known BatchNorm with running statistics left in ``model`` becomes a
    FrozenBatchNorm; one without them normalizes with batch statistics even in eval, so
    it stays."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, _BatchNorm) or not is_known_batchnorm(module):
            continue
        if _has_running_stats(module):
            _set_submodule(model, name, freeze(module).eval())
        else:
            warnings.warn(f"fold: BatchNorm {name!r} has no running statistics "
                          "(track_running_stats=False), so it uses batch statistics in eval "
                          "and was left in place", stacklevel=3)


def fold(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every foldable BatchNorm folded into the
    Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped too) or Linear layer feeding it.

    A BatchNorm (torch.nn's, ours with any variant option, FrozenBatchNorm, a subclass that
    :func:`batchnorm.convert` recognizes) is folded when its only input is such a layer's
    output, nothing else reads that output and the layer is called once; a fused
    activation stays as a torch.nn activation module. Every other such BatchNorm with
    running statistics becomes a :class:`batchnorm.FrozenBatchNorm2d` (and kin); one
    without (``track_running_stats=False``) and any other subclass are left in place with
    a warning.
    ``model`` is not modified; the result is in eval mode, a ``torch.fx.GraphModule`` when
    the model can be traced (else, with a warning, a copy whose BatchNorms are only
    frozen). Assumes batched input: a Linear's BatchNorm normalizes its last dim."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, BATCHNORMS):
        raise ValueError("fold: model is a single BatchNorm layer; there is nothing to fold "
                         "it into")
    unbuilt = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
               if is_lazy(tensor)]
    if unbuilt:
        raise ValueError(f"fold: {unbuilt[0]!r} is uninitialized (lazy module); run one "
                         "forward pass before folding")
    model = copy.deepcopy(model).eval()
    _replace_unknown(model)
    try:
        graph_module = trace(model)
    except Exception as error:  # fx raises many types on untraceable Python
        warnings.warn(f"fold: could not trace the model with torch.fx ({error}); no "
                      "BatchNorm was folded, they are replaced by FrozenBatchNorm",
                      stacklevel=2)
        _freeze_remaining(model)
        return model
    modules = dict(graph_module.named_modules())
    for pair in layer_batchnorm_pairs(graph_module):
        bn = modules[pair.bn_name]
        if not pair.exclusive or not _has_running_stats(bn):
            continue
        _set_submodule(graph_module, pair.layer_name, _folded(modules[pair.layer_name], bn))
        activation = _fused_activation(bn)
        if activation is None:
            pair.bn_node.replace_all_uses_with(pair.layer_node)
            graph_module.graph.erase_node(pair.bn_node)
        else:  # the BatchNorm's call now only applies its activation
            name = f"{pair.bn_name}_activation".replace(".", "_")
            graph_module.add_submodule(name, activation)
            pair.bn_node.target = name
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    _freeze_remaining(graph_module)
    return graph_module.eval()
