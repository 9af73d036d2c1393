"""Inference speedup of :func:`batchnorm.tools.fold` on a small ResNet-style CNN.

Times eval-mode forward passes of the model with torch.nn BatchNorm, with ours, and
folded (no BatchNorm left), with ``torch.utils.benchmark`` (warm-up, adaptive repeats),
in interleaved rounds keeping each model's best median.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import benchmark

import batchnorm
from batchnorm.tools import fold


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) shortcut, as in ResNet. ``shortcut_bias``
    gives the projection conv a bias, so folding must merge the BN into an existing one."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: type[nn.Module],
                 shortcut_bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm(channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == channels else \
            nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=shortcut_bias),
                          norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(norm: type[nn.Module], width: int = 32) -> nn.Module:
    """A CIFAR-sized ResNet with three stages of one block each."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU(),
        ResidualBlock(width, width, 1, norm), ResidualBlock(width, 2 * width, 2, norm),
        ResidualBlock(2 * width, 4 * width, 2, norm),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def _eval_ms(model: nn.Module, input: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer("model(input)", globals={"model": model, "input": input},
                            num_threads=torch.get_num_threads())
    with torch.no_grad():
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(quick: bool = False) -> dict:
    """Eval milliseconds per batch: torch.nn BN model, ours, and folded; the speedups."""
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
    min_run_time, rounds = (0.1, 1) if quick else (0.5, 5)
    models = {"torch_bn_ms": reference, "ours_bn_ms": ours.eval(), "folded_ms": folded}
    # Interleaved rounds, best median of each: load on a shared machine drifts over time.
    timings: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            timings[key].append(_eval_ms(model, input, min_run_time))
    torch_ms, ours_ms, folded_ms = (min(times) for times in timings.values())
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
        "torch_bn_ms": torch_ms,
        "ours_bn_ms": ours_ms,
        "folded_ms": folded_ms,
        "speedup_vs_torch_bn": torch_ms / folded_ms,
        "speedup_vs_ours_bn": ours_ms / folded_ms,
        "max_abs_diff": max_abs_diff,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
