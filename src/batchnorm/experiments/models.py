"""The models of the experiments, built from this library's normalization layers.

:func:`norm_layer` is the one place that turns a method name into a layer, so every
experiment measures the same implementation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

import batchnorm as layers  # the normalization layers under test

NORM_METHODS = ("bn", "renorm", "ghost", "gn", "ln", "in")
RENORM_CLIPPING = {"rmax": 3.0, "dmax": 5.0}  # the paper's final limits, without warm-up
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU,
    "leaky_relu": partial(nn.LeakyReLU, 0.2),  # TensorFlow's default slope
}


def norm_layer(method: str, channels: int, *, spatial: Sequence[int] = (), momentum: float = 0.1,
               eps: float = 1e-5, groups: int = 8, ghost_batch_size: int = 4) -> nn.Module:
    """The ``method`` normalization of ``channels`` features, each with ``spatial`` extent
    (``()`` for a linear layer's output, ``(H, W)`` for a conv layer's).

    bn: BatchNorm; renorm: Batch Renormalization clipped to RENORM_CLIPPING; ghost:
    BatchNorm over ghost batches of ``ghost_batch_size``; gn: GroupNorm with ``groups``
    groups; ln: LayerNorm over (C, *spatial); in: InstanceNorm with affine parameters."""
    batch_norm = {0: layers.BatchNorm1d, 1: layers.BatchNorm1d, 2: layers.BatchNorm2d,
                  3: layers.BatchNorm3d}[len(spatial)]
    if method == "bn":
        return batch_norm(channels, eps=eps, momentum=momentum)
    if method == "renorm":
        return batch_norm(channels, eps=eps, momentum=momentum, renorm=True,
                          renorm_clipping=RENORM_CLIPPING)
    if method == "ghost":
        return batch_norm(channels, eps=eps, momentum=momentum,
                          ghost_batch_size=ghost_batch_size)
    if method == "gn":
        return layers.GroupNorm(groups, channels, eps=eps)
    if method == "ln":
        return layers.LayerNorm((channels, *spatial), eps=eps)
    if method == "in":
        instance_norm = {1: layers.InstanceNorm1d, 2: layers.InstanceNorm2d,
                         3: layers.InstanceNorm3d}[len(spatial)]
        return instance_norm(channels, eps=eps, affine=True)
    raise ValueError(f"method must be one of {NORM_METHODS}, got {method!r}")


def mlp(sizes: Sequence[int], activation: str, *, norm: Callable[[int], nn.Module] | None = None,
        norm_after_activation: bool = False, norm_logits: bool = False,
        init: Callable[[nn.Parameter], object] | None = None) -> nn.Sequential:
    """``sizes[0] -> ... -> sizes[-1]`` perceptron on flattened inputs: Linear, then
    ``norm`` before (or after) each hidden activation, and optionally on the logits.
    ``init`` overrides the weights' initialization; biases then start at zero."""
    modules: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        if init is not None:
            init(linear.weight)
            nn.init.zeros_(linear.bias)
        modules.append(linear)
        if index == len(sizes) - 2:
            if norm is not None and norm_logits:
                modules.append(norm(fan_out))
        elif norm is None:
            modules.append(ACTIVATIONS[activation]())
        elif norm_after_activation:
            modules += [ACTIVATIONS[activation](), norm(fan_out)]
        else:
            modules += [norm(fan_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*modules)


def small_cnn(image_shape: Sequence[int], classes: int, method: str, *,
              widths: Sequence[int] = (16, 32), **norm_options: float) -> nn.Sequential:
    """conv3x3 -> norm -> ReLU -> 2x2 max-pool per width, then a linear classifier: small
    enough for batch size 2 on a CPU."""
    channels, height, width = image_shape
    modules: list[nn.Module] = []
    for out_channels in widths:
        modules += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    norm_layer(method, out_channels, spatial=(height, width), **norm_options),
                    nn.ReLU(), nn.MaxPool2d(2)]
        channels, height, width = out_channels, height // 2, width // 2
    modules += [nn.Flatten(), nn.Linear(channels * height * width, classes)]
    return nn.Sequential(*modules)


class StackedLinear(nn.Module):
    """``models`` independent linear layers applied in one batched matmul:
    ``(B, in)`` or ``(B, models, in)`` -> ``(B, models, out)``. Training many small models
    side by side this way is several times faster than one after another on a CPU."""

    def __init__(self, models: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(models, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(models, out_features))

    def forward(self, x: Tensor) -> Tensor:
        pattern = "bi,mio->bmo" if x.dim() == 2 else "bmi,mio->bmo"
        return torch.einsum(pattern, x, self.weight) + self.bias


class Stacked(nn.Module):
    """Applies a per-feature layer built for ``models * features`` channels to
    ``(B, models, features)``: a BatchNorm1d over the flattened channels keeps separate
    statistics for every (model, feature), exactly as the models would alone."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.reshape(len(x), -1)).view(x.shape)


def stacked_mlp(sizes: Sequence[int], activation: str, scales: Sequence[float], *,
                norm: Callable[[int], nn.Module] | None = None) -> nn.Sequential:
    """``len(scales)`` copies of :func:`mlp` (norm before each hidden activation), copy
    ``m`` with weights ~ N(0, scales[m]^2) and zero biases, trained side by side."""
    models = len(scales)
    modules: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = StackedLinear(models, fan_in, fan_out)
        with torch.no_grad():
            for weight, scale in zip(linear.weight, scales, strict=True):
                weight.normal_(0.0, scale)
        modules.append(linear)
        if index < len(sizes) - 2:
            if norm is not None:
                modules.append(Stacked(norm(models * fan_out)))
            modules.append(ACTIVATIONS[activation]())
    return nn.Sequential(*modules)
