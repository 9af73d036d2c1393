"""placement: BatchNorm before vs after the activation, for ReLU, sigmoid, tanh and ELU.

The same 300-100 MLP (SGD with momentum) is trained with BN between the linear layer and
the activation (the original paper's placement) and after the activation; validation
accuracy after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run, accuracy, run_seeds
from batchnorm.experiments.models import mlp, norm_layer
from batchnorm.experiments.plots import data_size, epoch_axis, markdown_table, save, subplots, title

if TYPE_CHECKING:
    from batchnorm.data import Split

PLACEMENTS = ("before", "after")


@dataclass(frozen=True)
class Config:
    activations: tuple[str, ...] = ("relu", "sigmoid", "tanh", "elu")
    hidden: tuple[int, ...] = (300, 100)
    batch_size: int = 100
    epochs: int = 8
    learning_rate: float = 0.01
    momentum: float = 0.9


TINY = Config(activations=("relu", "sigmoid"), hidden=(16,), batch_size=50, epochs=2)


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    sizes = [data.train_x[0].numel(), *config.hidden, 10]
    seeds = run_seeds(seed, len(config.activations))
    return [Run(name=f"{activation}/{placement}", seed=run_seed,
                build=partial(mlp, sizes, activation, norm=partial(norm_layer, "bn"),
                              norm_after_activation=placement == "after"),
                optimizer=partial(torch.optim.SGD, lr=config.learning_rate,
                                  momentum=config.momentum),
                train_x=data.train_x, train_y=data.train_y,
                batch_size=config.batch_size, records=config.epochs,
                steps_per_record=len(data.train_x) // config.batch_size,
                metrics={"val_acc": partial(accuracy, x=data.val_x, y=data.val_y)})
            for activation, run_seed in zip(config.activations, seeds, strict=True)
            for placement in PLACEMENTS]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    return {"epochs": list(range(1, config.epochs + 1)),
            "val_acc": {activation: {placement: histories[f"{activation}/{placement}"]["val_acc"]
                                     for placement in PLACEMENTS}
                        for activation in config.activations}}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    curves = results["val_acc"]
    figure, axes = subplots(1, len(curves), size=(3.2, 3.0), sharey=True)
    for axis, (activation, by_placement) in zip(axes, curves.items(), strict=True):
        for placement in PLACEMENTS:
            axis.plot(results["epochs"], by_placement[placement], marker=".",
                      label=f"BN {placement} activation")
        axis.set_title(activation)
        epoch_axis(axis)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(fontsize="small")
    config = results["config"]
    title(figure, results, f"{data_size(results)}, batch {config['batch_size']}, "
                           f"hidden {tuple(config['hidden'])}")
    return [save(figure, out, "placement.png")]


def table(results: dict[str, Any]) -> str:
    rows = [(activation, f"{curves['before'][-1]:.4f}", f"{curves['after'][-1]:.4f}")
            for activation, curves in results["val_acc"].items()]
    return ("Final validation accuracy:\n\n"
            + markdown_table(["activation", "BN before", "BN after"], rows))


EXPERIMENT = Experiment(
    name="placement",
    description="BN before vs after the activation, for ReLU, sigmoid, tanh and ELU.",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
