"""mnist-mlp: BatchNorm on a small MLP (Géron, *Hands-On Machine Learning*, ch. 11).

A 300-100 ELU MLP with He initialization, BN before each activation and on the logits
(TensorFlow's momentum 0.9, i.e. torch momentum 0.1, and epsilon 0.001), SGD lr 0.01,
batches of 200, 20 epochs; validation accuracy after every epoch, with and without BN.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run, accuracy, run_seeds
from batchnorm.experiments.models import mlp, norm_layer
from batchnorm.experiments.plots import data_size, epoch_axis, markdown_table, save, subplots, title

if TYPE_CHECKING:
    from batchnorm.data import Split

VARIANTS = ("bn", "no_bn")


@dataclass(frozen=True)
class Config:
    hidden: tuple[int, ...] = (300, 100)
    batch_size: int = 200
    epochs: int = 20
    learning_rate: float = 0.01
    tf_momentum: float = 0.9  # TensorFlow's decay of the moving averages
    eps: float = 1e-3  # TensorFlow's default


TINY = Config(hidden=(16,), batch_size=50, epochs=2)


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    sizes = [data.train_x[0].numel(), *config.hidden, 10]
    norm = partial(norm_layer, "bn", momentum=1.0 - config.tf_momentum, eps=config.eps)
    he_init = partial(nn.init.kaiming_normal_, nonlinearity="relu")
    return [Run(name=variant, seed=run_seed,
                build=partial(mlp, sizes, "elu", norm=norm if variant == "bn" else None,
                              norm_logits=True, init=he_init),
                optimizer=partial(torch.optim.SGD, lr=config.learning_rate),
                train_x=data.train_x, train_y=data.train_y,
                batch_size=config.batch_size, records=config.epochs,
                steps_per_record=len(data.train_x) // config.batch_size,
                metrics={"val_acc": partial(accuracy, x=data.val_x, y=data.val_y)})
            for variant, run_seed in zip(VARIANTS, run_seeds(seed, 1) * 2, strict=True)]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    return {"epochs": list(range(1, config.epochs + 1)),
            "val_acc": {variant: histories[variant]["val_acc"] for variant in VARIANTS}}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    figure, (axis,) = subplots(1, 1, size=(5.0, 3.5))
    for variant, label in (("bn", "BatchNorm"), ("no_bn", "no BatchNorm")):
        axis.plot(results["epochs"], results["val_acc"][variant], marker=".", label=label)
    epoch_axis(axis)
    axis.set_ylabel("validation accuracy")
    axis.legend()
    config = results["config"]
    title(figure, results, f"{data_size(results)}, batch {config['batch_size']}, SGD lr "
                           f"{config['learning_rate']}")
    return [save(figure, out, "mnist_mlp.png")]


def table(results: dict[str, Any]) -> str:
    curves = results["val_acc"]
    return markdown_table(["epoch", "BN", "no BN"],
                          [(epoch, f"{bn:.4f}", f"{no:.4f}") for epoch, bn, no in
                           zip(results["epochs"], curves["bn"], curves["no_bn"], strict=True)])


EXPERIMENT = Experiment(
    name="mnist-mlp",
    description="300-100 ELU MLP, BN before activations and on the logits vs no BN "
                "(Hands-On ML, ch. 11).",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
