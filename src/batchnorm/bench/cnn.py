"""The end-to-end number: one training epoch of a small CNN (two conv + BN + ReLU blocks)
on the real MNIST test set, with our batch_norm vs torch.nn.BatchNorm2d."""

from __future__ import annotations

import gzip
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import batchnorm.functional as bf

BATCH_SIZE = 128


class FunctionalBatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d's parameters and buffers around batchnorm.functional."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return bf.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training, self.momentum, self.eps)


def small_cnn(norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


def _idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    found, *shape = struct.unpack(f">I{ndim}I", data[:4 + 4 * ndim])
    if found != magic:
        raise ValueError(f"{path}: expected IDX magic {magic}, got {found}")
    return tuple(shape), data[4 + 4 * ndim:]


def load_mnist_test(root: Path) -> tuple[Tensor, Tensor] | None:
    """The 10,000 MNIST test images (scaled to [0, 1]) and labels, or None if absent."""
    images, labels = root / "mnist" / "t10k-images-idx3-ubyte.gz", \
        root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    shape, pixels = _idx(images, 2051)
    _, targets = _idx(labels, 2049)
    x = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(shape[0], 1, *shape[1:])
    y = torch.frombuffer(bytearray(targets), dtype=torch.uint8).long()
    return (x.float() / 255 - 0.1307) / 0.3081, y


def _epoch(model: nn.Module, images: Tensor, labels: Tensor, batches: int | None) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    start = time.perf_counter()
    for index, first in enumerate(range(0, len(images), BATCH_SIZE)):
        if batches is not None and index == batches:
            break
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[first:first + BATCH_SIZE]),
                                           labels[first:first + BATCH_SIZE])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def epoch_seconds(images: Tensor, labels: Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of one epoch per implementation, epochs interleaved, same init."""
    norms = {"ours": FunctionalBatchNorm2d, "torch": nn.BatchNorm2d}
    times: dict[str, list[float]] = {name: [] for name in norms}
    for norm in norms.values():
        torch.manual_seed(0)
        _epoch(small_cnn(norm), images, labels, batches=3)  # warm-up
    for _ in range(rounds):
        for name, norm in norms.items():
            torch.manual_seed(0)
            times[name].append(_epoch(small_cnn(norm), images, labels, batches=None))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}
