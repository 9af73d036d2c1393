"""Which layer feeds which BatchNorm: the graph, traced with torch.fx.

Shared by :func:`batchnorm.tools.fold` (which folds the pairs) and
:func:`batchnorm.tools.doctor` (which warns about a bias the BatchNorm cancels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from batchnorm.modules.batchnorm import _BatchNormForward
from batchnorm.modules.frozen import FrozenBatchNorm
from batchnorm.modules.syncbn import SyncBatchNorm

# Eval-mode BatchNorms: per-channel affine maps once their statistics are fixed.
BATCHNORMS = (_BatchNorm, FrozenBatchNorm)
# torch.nn's BatchNorms whose eval forward is exactly that map
_TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Layers whose output channels (dim 1 for convs, the last dim for Linear) a BatchNorm
# that follows them can be folded into.
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.Linear)


class NormLeafTracer(fx.Tracer):
    """torch.fx tracer that keeps every normalization layer a single call.

    fx already treats torch.nn's layers as leaves; ours live outside ``torch.nn`` and
    contain Python control flow on shapes, so they must be declared leaves too."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (_NormBase, FrozenBatchNorm, nn.GroupNorm, nn.LayerNorm)) or \
            super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a GraphModule sharing its submodules (raises what fx raises)."""
    graph = NormLeafTracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


@dataclass(frozen=True)
class LayerBatchNorm:
    """A BatchNorm call whose only input is the output of a foldable layer call."""

    layer_node: fx.Node
    bn_node: fx.Node
    exclusive: bool  # the layer's output has no other user and the layer no other call

    @property
    def layer_name(self) -> str:
        return str(self.layer_node.target)

    @property
    def bn_name(self) -> str:
        return str(self.bn_node.target)


def is_known_batchnorm(module: nn.Module) -> bool:
    """Whether ``module``'s forward is one we know to be a BatchNorm's affine map (then
    its fused activation, if any): torch's exact classes and ours. A subclass that
    overrides ``forward`` may compute anything else (an activation, a scale)."""
    return type(module) in _TORCH_BATCHNORMS or type(module).forward in (
        _BatchNormForward.forward, SyncBatchNorm.forward, FrozenBatchNorm.forward)


def _channel_axis_matches(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether the BatchNorm's channel axis is the layer's output-feature dim (assuming
    batched input: dim 1 of a conv output, the last dim of a 2D Linear output)."""
    axis = getattr(bn, "axis", 1)
    if isinstance(layer, nn.Linear):
        return axis in (1, -1)
    return axis == 1


def _output_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def layer_batchnorm_pairs(graph_module: fx.GraphModule) -> list[LayerBatchNorm]:
    """Every call of a known BatchNorm (FrozenBatchNorm too, see :func:`is_known_batchnorm`)
    fed by a conv/conv-transpose/linear call, with matching channels."""
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not is_known_batchnorm(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer, bn = modules[source.target], modules[node.target]
        if not isinstance(layer, FOLDABLE_LAYERS) or not _channel_axis_matches(layer, bn):
            continue
        if _output_features(layer) != bn.num_features:
            continue
        exclusive = len(source.users) == 1 and calls[source.target] == 1
        pairs.append(LayerBatchNorm(source, node, exclusive))
    return pairs


def sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) qualified names of neighbours in an ``nn.Sequential``: the
    fallback when a model cannot be traced."""
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (layer_name, layer), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(layer, FOLDABLE_LAYERS) and is_known_batchnorm(bn) and \
                    _output_features(layer) == bn.num_features:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + layer_name, prefix + bn_name))
    return pairs
