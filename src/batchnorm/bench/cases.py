"""The single-layer suite as data. A case names its shape, layout, mode and thread count
and builds its competitors as modules holding equal parameters and buffers: ours (a
``batchnorm`` layer), the baseline (the ``torch.nn`` layer, eager) and the module
``torch.compile`` is given. ``passes`` is the minimal traffic the roofline assumes;
``bound_passes`` the least that BatchNorm's data dependencies allow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import batchnorm
from batchnorm.bench.measure import Step

Factory = Callable[[], nn.Module]


def _fill(module: nn.Module) -> nn.Module:
    """Deterministic non-trivial parameters and running statistics, the same for any two
    modules that register the same tensors in the same order (ours subclass torch's)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.rsplit(".", 1)[-1] in ("weight", "running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return module


@dataclass(frozen=True)
class Case:
    """One suite entry. ``mode`` is "train" (forward + backward) or "eval" (forward only);
    ``threads`` runs the case on that many torch threads (None: the process's count)."""

    group: str
    name: str
    shape: tuple[int, ...]
    ours: Factory
    theirs: Factory
    mode: str = "train"
    channels_last: bool = False
    threads: int | None = None
    baseline: str = "torch eager"
    compiled: Factory | None = None  # what torch.compile gets; None: ``theirs``
    residual: bool = False  # the layer adds a shortcut of x's shape

    @property
    def passes(self) -> int:
        """Tensor-sized passes of the least traffic: training reads x and writes y forward,
        reads dy and x and writes dx backward (5; a shortcut adds its read forward and its
        gradient's write backward: 7); an eval forward reads x, writes y (2)."""
        if self.mode != "train":
            return 2
        return 7 if self.residual else 5

    @property
    def bound_passes(self) -> int | None:
        """Plain BatchNorm training (None for the other cases): 8 passes, since the batch
        statistics need all of x before any y (read x; read x, write y) and dx needs the
        reductions over all of dy (read dy and x; read dy and x, write dx)."""
        return 8 if self.group.startswith("BN training") else None

    @property
    def label(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.shape))}"

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def build(self, factory: Factory) -> nn.Module:
        return _fill(factory()).train(self.mode == "train")

    def step(self, module: nn.Module) -> Step:
        """One call as the case runs it: an eval forward without autograd, or a training
        forward + backward with a fixed output gradient (x and parameter grads reset)."""
        generator = torch.Generator().manual_seed(0)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.randn(self.shape, generator=generator).contiguous(memory_format=memory_format)
        if self.mode == "eval":
            def forward() -> object:
                with torch.no_grad():
                    return module(x)
            return forward
        grad = torch.randn(self.shape, generator=generator).contiguous(
            memory_format=memory_format)
        leaves = [x.requires_grad_(), *module.parameters()]

        def train() -> object:
            for leaf in leaves:
                leaf.grad = None
            module(x).backward(grad)
            return x.grad
        return train


def _batch_norm(group: str, name: str, shape: tuple[int, ...], **options) -> Case:
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    ours, theirs = getattr(batchnorm, f"BatchNorm{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    return Case(group, name, shape, partial(ours, shape[1]), partial(theirs, shape[1]),
                **options)


def _bn_train(name: str, shape: tuple[int, ...], **options) -> Case:
    return _batch_norm("BN training", name, shape, **options)


def _bn_eval(name: str, shape: tuple[int, ...], **options) -> Case:
    return _batch_norm("eval forward", name, shape, mode="eval", **options)


def _fixed_cost(shape: tuple[int, ...]) -> Case:
    """A call so small that the per-call overhead around the kernels is all there is."""
    return _batch_norm("BN training, 1 thread", "BN1d fixed cost (1 thread)", shape,
                       threads=1)


def _layer_norm(shape: tuple[int, ...], mode: str = "train") -> Case:
    group, name = ("LN/GN/IN training", "LayerNorm") if mode == "train" else \
        ("eval forward", "LayerNorm eval forward")
    return Case(group, name, shape, partial(batchnorm.LayerNorm, shape[-1]),
                partial(nn.LayerNorm, shape[-1]), mode=mode)


def _group_norm(shape: tuple[int, ...], groups: int) -> Case:
    return Case("LN/GN/IN training", f"GroupNorm ({groups} groups)", shape,
                partial(batchnorm.GroupNorm, groups, shape[1]),
                partial(nn.GroupNorm, groups, shape[1]))


def _instance_norm(shape: tuple[int, ...]) -> Case:
    return Case("LN/GN/IN training", "InstanceNorm2d (affine)", shape,
                partial(batchnorm.InstanceNorm2d, shape[1], affine=True),
                partial(nn.InstanceNorm2d, shape[1], affine=True))


def _fused_relu(shape: tuple[int, ...]) -> Case:
    """Ours with the ReLU fused vs ours BN followed by nn.ReLU (compile: torch's pair)."""
    channels = shape[1]
    return Case("fused BN+ReLU", "BN2d+ReLU fused", shape,
                partial(batchnorm.BatchNorm2d, channels, activation="relu"),
                lambda: nn.Sequential(batchnorm.BatchNorm2d(channels), nn.ReLU()),
                baseline="ours BN then ReLU",
                compiled=lambda: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()))


class _ResidualTail(nn.Module):
    """``relu(bn(x) + shortcut)``, a ResNet block's tail, fused (ours: ``bn(x, shortcut)``)
    or as torch's three ops; the shortcut is a parameter, so its gradient is computed."""

    def __init__(self, bn: nn.Module, shape: tuple[int, ...], fused: bool,
                 memory_format: torch.memory_format):
        super().__init__()
        self.bn, self.fused = bn, fused
        self.shortcut = nn.Parameter(torch.zeros(shape).contiguous(memory_format=memory_format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.bn(x, self.shortcut)
        return torch.relu(self.bn(x) + self.shortcut)


def _fused_residual(shape: tuple[int, ...], channels_last: bool = False) -> Case:
    """Ours fused against torch.nn's BatchNorm2d, add and ReLU."""
    channels = shape[1]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return Case("fused BN+ReLU", "BN2d+add+ReLU fused" + " channels_last" * channels_last,
                shape,
                lambda: _ResidualTail(batchnorm.BatchNorm2d(channels, activation="relu"), shape,
                                      True, memory_format),
                lambda: _ResidualTail(nn.BatchNorm2d(channels), shape, False, memory_format),
                channels_last=channels_last, residual=True)


SUITE: tuple[Case, ...] = (
    _bn_train("BN2d", (64, 256, 28, 28)),
    _bn_train("BN2d", (32, 64, 56, 56)),
    _bn_train("BN2d", (128, 128, 14, 14)),
    _bn_train("BN2d", (8, 32, 112, 112)),
    _bn_train("BN2d", (256, 512, 7, 7)),
    _bn_train("BN2d channels_last", (32, 64, 56, 56), channels_last=True),
    _bn_train("BN2d channels_last", (128, 128, 14, 14), channels_last=True),
    _bn_train("BN1d", (4096, 1024)),
    _bn_train("BN1d", (512, 2048)),
    _bn_train("BN1d", (256, 1024)),
    _bn_train("BN1d", (64, 300)),
    _bn_train("BN1d (N, C, L)", (16, 128, 64)),
    _bn_train("BN3d", (4, 32, 16, 28, 28)),
    _fixed_cost((8, 16)),
    _layer_norm((8192, 768)),
    _layer_norm((2048, 4096)),
    _group_norm((32, 256, 28, 28), 32),
    _instance_norm((16, 64, 64, 64)),
    _bn_eval("BN2d eval forward", (64, 256, 28, 28)),
    _bn_eval("BN2d channels_last eval forward", (32, 64, 56, 56), channels_last=True),
    _bn_eval("BN1d eval forward", (256, 1024)),
    _bn_eval("BN1d eval fixed cost (1 thread)", (8, 16), threads=1),
    _layer_norm((8192, 768), mode="eval"),
    _fused_relu((64, 256, 28, 28)),
    _fused_residual((32, 64, 56, 56)),
    _fused_residual((32, 64, 56, 56), channels_last=True),
)

# Tiny shapes with the same structure, for the smoke test (--quick --tiny).
TINY: tuple[Case, ...] = (
    _bn_train("BN2d", (4, 8, 6, 6)),
    _bn_train("BN2d channels_last", (4, 8, 6, 6), channels_last=True),
    _bn_train("BN1d", (16, 8)),
    _bn_train("BN1d (N, C, L)", (4, 8, 5)),
    _fixed_cost((8, 16)),
    _layer_norm((16, 32)),
    _group_norm((4, 8, 6, 6), 4),
    _instance_norm((4, 8, 6, 6)),
    _bn_eval("BN2d eval forward", (4, 8, 6, 6)),
    _layer_norm((16, 32), mode="eval"),
    _fused_relu((4, 8, 6, 6)),
    _fused_residual((4, 8, 6, 6), channels_last=True),
)
