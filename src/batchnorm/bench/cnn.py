"""The end-to-end number: one training epoch of a small CNN (two conv + BN + ReLU blocks)
on the real MNIST test set, with batchnorm.BatchNorm2d vs torch.nn.BatchNorm2d."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

import batchnorm
from batchnorm.bench import measure
from batchnorm.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

BATCH_SIZE = 128


def small_cnn(norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


def load_mnist_test(root: Path) -> tuple[Tensor, Tensor] | None:
    """The 10,000 MNIST test images (standardized) and labels, or None if absent."""
    images, labels = root / "mnist" / "t10k-images-idx3-ubyte.gz", \
        root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    pixels = torch.from_numpy(read_idx(images, magic=IMAGES_MAGIC)).unsqueeze(1)
    targets = torch.from_numpy(read_idx(labels, magic=LABELS_MAGIC)).long()
    return (pixels.float() / 255 - 0.1307) / 0.3081, targets


def _epoch(model: nn.Module, images: Tensor, labels: Tensor, batches: int | None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for index, first in enumerate(range(0, len(images), BATCH_SIZE)):
        if batches is not None and index == batches:
            break
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[first:first + BATCH_SIZE]),
                                           labels[first:first + BATCH_SIZE])
        loss.backward()
        optimizer.step()


def time_epochs(images: Tensor, labels: Tensor, rounds: int, limits: measure.Limits
                ) -> dict[str, object]:
    """Seconds of one epoch (model built from the same seed included) with ours and with
    torch.nn, epochs interleaved; their ratio (torch over ours) and its spread."""
    norms = {"ours": batchnorm.BatchNorm2d, "torch": nn.BatchNorm2d}

    def epoch(norm: Callable[[int], nn.Module], batches: int | None = None) -> None:
        torch.manual_seed(0)
        _epoch(small_cnn(norm), images, labels, batches)

    for norm in norms.values():
        epoch(norm, batches=3)  # warm-up
    timed = measure.interleaved_rounds({name: partial(epoch, norm)
                                        for name, norm in norms.items()},
                                       rounds, warmup=0, min_round_s=0)
    return {"batch_size": BATCH_SIZE, "ours_s": timed.ms("ours") / 1e3,
            "torch_s": timed.ms("torch") / 1e3,
            "speedup": timed.compare("torch", "ours", limits),
            "load_1min": timed.load_1min, "cpu_wait": timed.cpu_wait,
            "rounds_ms": timed.rounds_ms()}
