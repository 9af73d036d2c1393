"""norms: what BatchNorm, LayerNorm, InstanceNorm and GroupNorm reduce over, checked.

On an (N, C, H, W) = (4, 6, 240, 240) tensor whose every (sample, channel) slice has its
own offset and scale, each layer's train-mode output is compared with
``(x - mean) / sqrt(var + eps)`` computed by :func:`batchnorm.functional.moments` over the
dims the method is said to reduce: BN over (N, H, W) -> C = 6 groups, LN over (C, H, W)
-> N = 4, IN over (H, W) -> N x C = 24, GN with G = 2 over (C/G, H, W) -> N x G = 8.
Any other grouping would leave a large difference. G must lie strictly between 1 and C
(G = 1 is LayerNorm, G = C InstanceNorm), so the figure shows what a group is. Then the
running-mean check: one training step of BatchNorm1d(16) on ``torch.rand(100, 16, 784)``
moves the running means from 0 to momentum x 0.5 = 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run
from batchnorm.experiments.models import layers
from batchnorm.experiments.plots import markdown_table, save, subplots, title
from batchnorm.functional import moments

if TYPE_CHECKING:
    from batchnorm.data import Split

TOLERANCE = 1e-4  # max |layer - reference| in float32 on unit-variance outputs


@dataclass(frozen=True)
class Config:
    shape: tuple[int, int, int, int] = (4, 6, 240, 240)
    groups: int = 2
    eps: float = 1e-5
    running_shape: tuple[int, int, int] = (100, 16, 784)
    momentum: float = 0.1


TINY = Config(shape=(4, 6, 24, 24), running_shape=(100, 16, 78))


@dataclass(frozen=True)
class Method:
    """A layer, and what it should reduce: ``dims`` of x viewed as (N, G, C/G, H, W)."""

    layer: nn.Module
    view_groups: int
    dims: tuple[int, ...]
    reduced: str
    expected_groups: int


def _methods(config: Config) -> dict[str, Method]:
    n, c, h, w = config.shape
    return {
        "batch": Method(layers.BatchNorm2d(c, eps=config.eps, affine=False), c, (0, 3, 4),
                        "N, H, W", c),
        "layer": Method(layers.LayerNorm((c, h, w), eps=config.eps, elementwise_affine=False),
                        1, (2, 3, 4), "C, H, W", n),
        "instance": Method(layers.InstanceNorm2d(c, eps=config.eps), c, (2, 3, 4), "H, W",
                           n * c),
        "group": Method(layers.GroupNorm(config.groups, c, eps=config.eps, affine=False),
                        config.groups, (2, 3, 4), "C/G, H, W", n * config.groups),
    }


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = config.shape
    if not 1 < config.groups < c or c % config.groups:
        raise ValueError(f"groups must divide the {c} channels and lie strictly between 1 "
                         f"(LayerNorm) and {c} (InstanceNorm), got {config.groups}")
    offset = torch.randn(n, c, 1, 1, generator=generator) * 3
    scale = torch.rand(n, c, 1, 1, generator=generator) * 4 + 0.5
    x = torch.randn(config.shape, generator=generator) * scale + offset
    checks = {}
    for name, method in _methods(config).items():
        grouped = x.reshape(n, method.view_groups, c // method.view_groups, h, w)
        mean, var = moments(grouped, method.dims, keepdim=True)
        reference = ((grouped - mean) / torch.sqrt(var + config.eps)).reshape(x.shape)
        with torch.no_grad():
            error = float((method.layer.train()(x) - reference).abs().max())
        checks[name] = {"reduced_dims": method.reduced, "groups": mean.numel(),
                        "expected_groups": method.expected_groups, "max_abs_error": error,
                        "ok": mean.numel() == method.expected_groups and error < TOLERANCE}
    running_norm = layers.BatchNorm1d(config.running_shape[1], momentum=config.momentum)
    with torch.no_grad():
        running_norm.train()(torch.rand(config.running_shape, generator=generator))
    running_mean = running_norm.running_mean
    expected = config.momentum * 0.5
    return {"methods": checks,
            "running_mean": {"expected": expected, "mean": float(running_mean.mean()),
                             "min": float(running_mean.min()),
                             "max": float(running_mean.max()),
                             "ok": bool((running_mean - expected).abs().max() < 1e-3)}}


def group_ids(n: int, c: int, groups: int) -> dict[str, torch.Tensor]:
    """Per method, an (N, C) grid of statistics-group numbers: cells with the same
    number share one mean and variance (over all H x W positions)."""
    sample, channel = torch.meshgrid(torch.arange(n), torch.arange(c), indexing="ij")
    return {"batch": channel, "layer": sample, "instance": sample * c + channel,
            "group": sample * groups + channel // (c // groups)}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Each method's groups on the (N, C) grid: cells of one color and number share
    statistics (over all H x W positions)."""
    config = results["config"]
    n, c = config["shape"][:2]
    ids_by_method = group_ids(n, c, config["groups"])
    figure, axes = subplots(1, len(ids_by_method), size=(2.6, 2.6))
    for axis, (name, ids) in zip(axes, ids_by_method.items(), strict=True):
        axis.imshow(ids.numpy() % 20, cmap="tab20", vmin=0, vmax=19)
        for (row, column), group in zip(torch.cartesian_prod(torch.arange(n), torch.arange(c))
                                        .tolist(), ids.flatten().tolist(), strict=True):
            axis.text(column, row, str(group), ha="center", va="center", fontsize="x-small")
        axis.set_title(f"{name}: {results['methods'][name]['groups']} groups")
        axis.set_xlabel("channel C")
        axis.set_xticks(range(c))
        axis.set_yticks(range(n))
    axes[0].set_ylabel("sample N")
    title(figure, results, f"(N, C, H, W) = {tuple(config['shape'])}, GroupNorm with "
                           f"G = {config['groups']} groups of {c // config['groups']} channels")
    return [save(figure, out, "norms.png")]


def table(results: dict[str, Any]) -> str:
    rows = [(name, check["reduced_dims"], check["groups"], f"{check['max_abs_error']:.1e}",
             "ok" if check["ok"] else "FAILED") for name, check in results["methods"].items()]
    running = results["running_mean"]
    return (markdown_table(["norm", "reduced dims", "groups", "max abs error", "check"], rows)
            + f"\n\nBatchNorm1d running mean after one step: {running['mean']:.4f} "
              f"(min {running['min']:.4f}, max {running['max']:.4f}; expected "
              f"{running['expected']:.2f}): {'ok' if running['ok'] else 'FAILED'}")


def runs(config: Config, data: Split | None, seed: int) -> list[Run]:
    return []


EXPERIMENT = Experiment(
    name="norms",
    description="What BN/LN/IN/GN reduce over on a (4, 6, 240, 240) tensor, and the "
                "BatchNorm1d running-mean check.",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table,
    needs_data=False)
