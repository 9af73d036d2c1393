"""batch-size: normalization methods across batch sizes (Wu & He, *Group Normalization*,
Table 2, on MNIST with a small CNN).

BatchNorm's statistics get noisy as the batch shrinks; GroupNorm, LayerNorm and
InstanceNorm do not depend on the batch; Batch Renormalization and ghost batches are the
BN variants meant to help. Every method is trained at batch sizes 2..64 for the same
number of epochs over the first ``train_size`` training images (only those) with the
learning rate scaled linearly with the batch size; the final validation error (eval
mode) is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run, accuracy, run_seeds
from batchnorm.experiments.models import small_cnn
from batchnorm.experiments.plots import data_size, markdown_table, save, subplots, title

if TYPE_CHECKING:
    from batchnorm.data import Split

LABELS = {"bn": "BatchNorm", "renorm": "Batch Renorm", "ghost": "ghost batches",
          "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm"}


@dataclass(frozen=True)
class Config:
    methods: tuple[str, ...] = ("bn", "gn", "ln", "in", "renorm", "ghost")
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    widths: tuple[int, ...] = (16, 32)
    groups: int = 4
    ghost_batches: int = 4  # ghost batch size = max(2, batch size // ghost_batches)
    epochs: int = 2
    train_size: int = 4000
    # At batch size 32, scaled linearly; 0.025 (0.05 at batch 64) diverged for some seeds.
    learning_rate: float = 0.0125
    momentum: float = 0.9


TINY = Config(batch_sizes=(2, 8), widths=(4, 8), groups=2, epochs=1, train_size=64)


def _run_name(method: str, batch_size: int) -> str:
    return f"{method}/{batch_size}"


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    if not 0 < config.train_size <= len(data.train_x):
        raise ValueError(f"train_size must be in [1, {len(data.train_x)}] for {data.name}, "
                         f"got {config.train_size}")
    seeds = run_seeds(seed, len(config.batch_sizes))
    x, y = data.train_x[:config.train_size], data.train_y[:config.train_size]
    metrics = {"val_acc": partial(accuracy, x=data.val_x, y=data.val_y)}
    return [Run(name=_run_name(method, batch_size), seed=run_seed,
                build=partial(small_cnn, tuple(data.train_x.shape[1:]), 10, method,
                              widths=config.widths, groups=config.groups,
                              ghost_batch_size=max(2, batch_size // config.ghost_batches)),
                optimizer=partial(torch.optim.SGD, momentum=config.momentum,
                                  lr=config.learning_rate * batch_size / 32),
                train_x=x, train_y=y, batch_size=batch_size, records=config.epochs,
                steps_per_record=config.train_size // batch_size, metrics=metrics)
            for method in config.methods
            for batch_size, run_seed in zip(config.batch_sizes, seeds, strict=True)]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    return {"batch_sizes": list(config.batch_sizes),
            "val_error": {method: [1.0 - histories[_run_name(method, size)]["val_acc"][-1]
                                   for size in config.batch_sizes]
                          for method in config.methods}}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    figure, (axis,) = subplots(1, 1, size=(5.5, 3.8))
    for method, errors in results["val_error"].items():
        axis.plot(results["batch_sizes"], [100 * e for e in errors], marker="o",
                  label=LABELS[method])
    axis.set_xscale("log", base=2)
    axis.set_xticks(results["batch_sizes"], [str(b) for b in results["batch_sizes"]])
    axis.set_xlabel("batch size (images per worker)")
    axis.set_ylabel("validation error (%)")
    axis.legend(fontsize="small")
    config = results["config"]
    title(figure, results, f"small CNN, {data_size(results, config['train_size'])}, "
                           f"{config['epochs']} epochs")
    return [save(figure, out, "batch_size.png")]


def table(results: dict[str, Any]) -> str:
    sizes = results["batch_sizes"]
    rows = [(LABELS[method], *(f"{100 * e:.2f}" for e in errors))
            for method, errors in results["val_error"].items()]
    return ("Validation error (%) per batch size:\n\n"
            + markdown_table(["method", *map(str, sizes)], rows))


EXPERIMENT = Experiment(
    name="batch-size",
    description="BN, GN, LN, IN, Batch Renorm and ghost batches at batch sizes 2-64 "
                "(GroupNorm paper, Table 2).",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
