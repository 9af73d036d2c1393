"""The fixed benchmark suite as data: each case builds its inputs and the three
competitors (ours = batchnorm.functional, torch eager = torch.nn.functional, and the op
torch.compile is given), and says how many tensor passes its minimal traffic is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import batchnorm.functional as bf

Op = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One suite entry. ``mode`` is "train" (forward + backward) or "eval" (forward only).

    ``ours``/``theirs`` take (x, weight, bias, running_mean, running_var); ``passes`` is the
    minimal traffic in tensor-sized passes: forward read x + write y, backward read dy and
    x + write dx (5 for training, 2 for an eval forward)."""

    family: str
    name: str
    shape: tuple[int, ...]
    ours: Op
    theirs: Op
    params: int
    mode: str = "train"
    channels_last: bool = False
    baseline: str = "torch eager"
    compiled: Op | None = None  # what torch.compile gets; None: ``theirs``

    @property
    def passes(self) -> int:
        return 5 if self.mode == "train" else 2

    def inputs(self, generator: torch.Generator) -> list[torch.Tensor]:
        x = torch.randn(self.shape, generator=generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.rand(self.params, generator=generator) + 0.5
        bias = torch.randn(self.params, generator=generator)
        return [x, weight, bias, torch.zeros(self.params), torch.ones(self.params)]


def _bn(training: bool) -> tuple[Op, Op]:
    def ours(x, w, b, rm, rv):
        return bf.batch_norm(x, rm, rv, w, b, training)

    def theirs(x, w, b, rm, rv):
        return F.batch_norm(x, rm, rv, w, b, training)

    return ours, theirs


def _batch_norm(name: str, shape: tuple[int, ...], **kwargs) -> Case:
    ours, theirs = _bn(kwargs.get("mode", "train") == "train")
    return Case("batch_norm", name, shape, ours, theirs, shape[1], **kwargs)


def _layer_norm(shape: tuple[int, ...]) -> Case:
    width = shape[-1]
    return Case("layer_norm", "LayerNorm", shape,
                lambda x, w, b, *_: bf.layer_norm(x, (width,), w, b),
                lambda x, w, b, *_: F.layer_norm(x, (width,), w, b), width)


def _group_norm(shape: tuple[int, ...], groups: int, name: str) -> Case:
    return Case("group_norm", name, shape,
                lambda x, w, b, *_: bf.group_norm(x, groups, w, b),
                lambda x, w, b, *_: F.group_norm(x, groups, w, b), shape[1])


def _instance_norm(shape: tuple[int, ...]) -> Case:
    return Case("instance_norm", "InstanceNorm2d", shape,
                lambda x, w, b, *_: bf.instance_norm(x, weight=w, bias=b),
                lambda x, w, b, *_: F.instance_norm(x, weight=w, bias=b), shape[1])


def _fused_relu(shape: tuple[int, ...]) -> Case:
    """Ours fused vs ours BN followed by torch.relu (the issue's comparison)."""
    return Case("fused", "BN2d+ReLU fused", shape,
                lambda x, w, b, rm, rv: bf.batch_norm(x, rm, rv, w, b, True,
                                                      activation="relu"),
                lambda x, w, b, rm, rv: torch.relu(bf.batch_norm(x, rm, rv, w, b, True)),
                shape[1], baseline="ours BN then torch.relu",
                compiled=lambda x, w, b, rm, rv: torch.relu(F.batch_norm(x, rm, rv, w, b, True)))


SUITE: tuple[Case, ...] = (
    _batch_norm("BN2d", (64, 256, 28, 28)),
    _batch_norm("BN2d", (32, 64, 56, 56)),
    _batch_norm("BN2d", (128, 128, 14, 14)),
    _batch_norm("BN2d", (8, 32, 112, 112)),
    _batch_norm("BN2d", (256, 512, 7, 7)),
    _batch_norm("BN2d channels_last", (32, 64, 56, 56), channels_last=True),
    _batch_norm("BN2d channels_last", (128, 128, 14, 14), channels_last=True),
    _batch_norm("BN1d", (4096, 1024)),
    _batch_norm("BN1d", (256, 1024)),
    _batch_norm("BN1d", (64, 300)),
    _batch_norm("BN3d", (4, 32, 16, 28, 28)),
    _batch_norm("BN2d eval forward", (64, 256, 28, 28), mode="eval"),
    _layer_norm((8192, 768)),
    _layer_norm((2048, 4096)),
    _group_norm((32, 256, 28, 28), 32, "GroupNorm (32 groups)"),
    _instance_norm((16, 64, 64, 64)),
    _fused_relu((64, 256, 28, 28)),
)

# Tiny shapes with the same structure, for the smoke test (--quick --tiny).
TINY: tuple[Case, ...] = (
    _batch_norm("BN2d", (4, 8, 6, 6)),
    _batch_norm("BN2d channels_last", (4, 8, 6, 6), channels_last=True),
    _batch_norm("BN1d", (16, 8)),
    _batch_norm("BN2d eval forward", (4, 8, 6, 6), mode="eval"),
    _layer_norm((16, 32)),
    _group_norm((4, 8, 6, 6), 4, "GroupNorm (4 groups)"),
    _instance_norm((4, 8, 6, 6)),
    _fused_relu((4, 8, 6, 6)),
)
