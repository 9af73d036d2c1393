"""Inference speedup of :func:`batchnorm.tools.fold` on a small ResNet-style CNN.

Times eval-mode forward passes of the model with torch.nn BatchNorm, with ours, and
folded (no BatchNorm left), in interleaved rounds (median per model).
"""

from __future__ import annotations

import torch
from torch import nn

import batchnorm
from batchnorm.bench.measure import Limits, Step, interleaved_rounds
from batchnorm.bench.models import ResidualBlock
from batchnorm.tools import fold


def resnet(norm: type[nn.Module], width: int = 32) -> nn.Module:
    """A CIFAR-sized ResNet with three stages of one block each."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU(),
        ResidualBlock(width, width, 1, norm), ResidualBlock(width, 2 * width, 2, norm),
        ResidualBlock(2 * width, 4 * width, 2, norm),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def _eval_step(model: nn.Module, input: torch.Tensor) -> Step:
    def forward() -> object:
        with torch.no_grad():
            return model(input)
    return forward


def measure(quick: bool = False, limits: Limits | None = None) -> dict:
    """Eval milliseconds per batch: torch.nn BN model, ours, and folded; the speedups, and
    whether the folded-vs-torch ratio was steady over the interleaved rounds."""
    limits = limits or Limits()
    torch.manual_seed(0)
    batch = 8 if quick else 32
    input = torch.randn(batch, 3, 32, 32)
    reference = resnet(nn.BatchNorm2d).train()
    with torch.no_grad():
        for _ in range(2):  # non-trivial running statistics
            reference(torch.randn(batch, 3, 32, 32))
    reference.eval()
    ours = batchnorm.convert(resnet(nn.BatchNorm2d))
    ours.load_state_dict(reference.state_dict())
    folded = fold(reference)
    rounds, min_round_s = (3, 0.02) if quick else (9, 0.2)
    timed = interleaved_rounds(
        {"torch": _eval_step(reference, input), "ours": _eval_step(ours.eval(), input),
         "folded": _eval_step(folded, input)}, rounds, warmup=1, min_round_s=min_round_s)
    torch_ms, ours_ms, folded_ms = (timed.ms(name) for name in ("torch", "ours", "folded"))
    with torch.no_grad():
        max_abs_diff = (folded(input) - reference(input)).abs().max().item()
    return {
        "benchmark": "fold",
        "model": "ResNet-style CNN, 3 residual stages, width 32, "
                 f"{sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())} "
                 "BatchNorm2d",
        "input_shape": list(input.shape),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "load_1min": timed.load_1min,
        "cpu_wait": timed.cpu_wait,
        "torch_bn_ms": torch_ms,
        "ours_bn_ms": ours_ms,
        "folded_ms": folded_ms,
        "speedup_vs_torch_bn": torch_ms / folded_ms,
        "speedup_vs_ours_bn": ours_ms / folded_ms,
        "vs_torch_bn_rounds": timed.compare("torch", "folded", limits),
        "rounds_ms": timed.rounds_ms(),
        "max_abs_diff": max_abs_diff,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
