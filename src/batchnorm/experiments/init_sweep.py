"""init-sweep: BatchNorm makes training insensitive to the weight scale (Saito, *Deep
Learning from Scratch*, ch. 6.3).

A 784-100x5-10 ReLU MLP with and without BN is trained on the first ``train_size``
(1,000) training images, and only on them, with SGD, batches of 100 drawn with
replacement, from weights ~ N(0, w^2) for 16 scales w in logspace(0, -4, 16). Train
accuracy (eval mode, on those same images) is recorded every 10 updates. Without BN only
scales near 0.3-0.16 learn; with BN every scale does, the small ones best.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run, accuracy
from batchnorm.experiments.models import norm_layer, stacked_mlp
from batchnorm.experiments.plots import markdown_table, save, subplots, title

if TYPE_CHECKING:
    from batchnorm.data import Split

VARIANTS = ("bn", "no_bn")


@dataclass(frozen=True)
class Config:
    scales: tuple[float, ...] = tuple(float(w) for w in np.logspace(0, -4, 16))
    hidden: tuple[int, ...] = (100,) * 5
    train_size: int = 1000
    batch_size: int = 100
    learning_rate: float = 0.01
    eps: float = 1e-6  # the book's
    records: int = 20
    steps_per_record: int = 10


TINY = Config(scales=(1.0, 0.01), hidden=(16, 16), train_size=100, batch_size=20, records=3,
              steps_per_record=2)


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    """Two runs (BN, no BN), each the 16 scales' MLPs stacked side by side, trained on the
    first ``train_size`` images; both see the same batches."""
    if not 0 < config.train_size <= len(data.train_x):
        raise ValueError(f"train_size must be in [1, {len(data.train_x)}] for {data.name}, "
                         f"got {config.train_size}")
    x, y = data.train_x[:config.train_size], data.train_y[:config.train_size]
    sizes = [data.train_x[0].numel(), *config.hidden, 10]
    norms = {"bn": partial(norm_layer, "bn", eps=config.eps), "no_bn": None}
    return [Run(name=variant, seed=seed,
                build=partial(stacked_mlp, sizes, "relu", config.scales, norm=norms[variant]),
                optimizer=partial(torch.optim.SGD, lr=config.learning_rate),
                train_x=x, train_y=y, batch_size=config.batch_size, records=config.records,
                steps_per_record=config.steps_per_record,
                metrics={"train_acc": partial(accuracy, x=x, y=y)}, replacement=True)
            for variant in VARIANTS]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    """Curves per scale: the histories record all scales at once, one list per record."""
    return {
        "scales": list(config.scales),
        "updates": [config.steps_per_record * (i + 1) for i in range(config.records)],
        "curves": {variant: [list(curve) for curve in zip(*histories[variant]["train_acc"],
                                                            strict=True)]
                   for variant in VARIANTS},
    }


def plot(results: dict[str, Any], out: Path) -> list[str]:
    scales, curves, updates = results["scales"], results["curves"], results["updates"]
    columns = int(np.ceil(np.sqrt(len(scales))))
    rows = int(np.ceil(len(scales) / columns))
    figure, axes = subplots(rows, columns, size=(3.0, 2.4), sharex=True, sharey=True)
    for index, (axis, scale) in enumerate(zip(axes, scales, strict=False)):
        axis.plot(updates, curves["bn"][index], label="BatchNorm")
        axis.plot(updates, curves["no_bn"][index], "--", label="no BatchNorm")
        axis.set_title(f"w = {scale:.2g}")
        axis.set_ylim(0, 1.02)
    for axis in axes[len(scales):]:
        axis.set_visible(False)
    # beside the grid, where it covers no curve
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center left",
                  bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.supxlabel("updates")
    figure.supylabel("train accuracy (eval mode)")
    config = results["config"]
    title(figure, results, f"trained and scored on the first {config['train_size']:,} "
                           f"training images, batch {config['batch_size']}, SGD lr "
                           f"{config['learning_rate']}")
    return [save(figure, out, "init_sweep.png")]


def final_accuracies(results: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(scale, final BN accuracy, final no-BN accuracy) per scale."""
    return [(scale, bn[-1], no_bn[-1]) for scale, bn, no_bn in
            zip(results["scales"], results["curves"]["bn"], results["curves"]["no_bn"],
                strict=True)]


def table(results: dict[str, Any]) -> str:
    rows = final_accuracies(results)
    wins = sum(bn > no_bn for _, bn, no_bn in rows)
    return (markdown_table(["weight scale", "BN", "no BN"],
                           [(f"{s:.3g}", f"{bn:.3f}", f"{no:.3f}") for s, bn, no in rows])
            + f"\n\nFinal train accuracy; BN beats no BN at {wins} of {len(rows)} scales.")


EXPERIMENT = Experiment(
    name="init-sweep",
    description="784-100x5-10 ReLU MLP with and without BN over 16 weight scales "
                "(Deep Learning from Scratch, ch. 6).",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
