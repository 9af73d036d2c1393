"""recalibrate: precise BatchNorm statistics close the eval gap of a too-high momentum
(Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021, section 3).

With momentum 1 the running statistics are those of the last training batch alone, so
eval-mode accuracy falls below what the network reaches on its own batch statistics.
A 784-100-100-10 ReLU MLP with BN before each activation is trained with several
momenta on the same batches; after every epoch the validation accuracy is measured in
eval mode as trained, and again after :func:`batchnorm.tools.recalibrate` (on a copy)
over ``recalibration_batches`` training batches of the training batch size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from batchnorm.experiments.base import Experiment
from batchnorm.experiments.loop import History, Run, accuracy, run_seeds
from batchnorm.experiments.models import mlp, norm_layer
from batchnorm.experiments.plots import data_size, markdown_table, save, subplots, title
from batchnorm.tools import recalibrate

if TYPE_CHECKING:
    from batchnorm.data import Split


@dataclass(frozen=True)
class Config:
    momenta: tuple[float, ...] = (0.1, 0.9, 1.0)
    hidden: tuple[int, ...] = (100, 100)
    batch_size: int = 16  # small: the last batch's statistics are noisy
    epochs: int = 3
    learning_rate: float = 0.025
    sgd_momentum: float = 0.9
    recalibration_batches: int = 200


TINY = Config(momenta=(0.1, 1.0), hidden=(16,), batch_size=16, epochs=1,
              recalibration_batches=5)


def recalibrated_accuracy(model: nn.Module, *, train_x: Tensor, x: Tensor, y: Tensor,
                          batch_size: int, num_batches: int, seed: int) -> float:
    """Validation accuracy of a copy of ``model`` after recalibrating its BatchNorm
    statistics over ``num_batches`` random training batches (the model is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    batches = (train_x[torch.randint(len(train_x), (batch_size,), generator=generator)]
               for _ in range(num_batches))
    return accuracy(recalibrate(copy.deepcopy(model), batches, num_batches), x, y)


def _run_name(momentum: float) -> str:
    return f"momentum={momentum}"


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    run_seed, recalibration_seed = run_seeds(seed, 2)
    sizes = [data.train_x[0].numel(), *config.hidden, 10]
    metrics = {
        "val_acc": partial(accuracy, x=data.val_x, y=data.val_y),
        "val_acc_recalibrated": partial(
            recalibrated_accuracy, train_x=data.train_x, x=data.val_x, y=data.val_y,
            batch_size=config.batch_size, num_batches=config.recalibration_batches,
            seed=recalibration_seed),
    }
    # Same seed for every momentum: same initialization, same batches.
    return [Run(name=_run_name(momentum), seed=run_seed,
                build=partial(mlp, sizes, "relu",
                              norm=partial(norm_layer, "bn", momentum=momentum)),
                optimizer=partial(torch.optim.SGD, lr=config.learning_rate,
                                  momentum=config.sgd_momentum),
                train_x=data.train_x, train_y=data.train_y,
                batch_size=config.batch_size, records=config.epochs,
                steps_per_record=len(data.train_x) // config.batch_size, metrics=metrics)
            for momentum in config.momenta]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    return {"epochs": list(range(1, config.epochs + 1)), "momenta": list(config.momenta),
            **{metric: {_run_name(m): histories[_run_name(m)][metric] for m in config.momenta}
               for metric in ("val_acc", "val_acc_recalibrated")}}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    figure, (axis,) = subplots(1, 1, size=(5.5, 3.5))
    for index, momentum in enumerate(results["momenta"]):
        name, color = _run_name(momentum), f"C{index}"
        axis.plot(results["epochs"], results["val_acc"][name], marker=".", color=color,
                  label=f"{name}, running statistics")
        axis.plot(results["epochs"], results["val_acc_recalibrated"][name], marker="x",
                  linestyle="--", color=color, label=f"{name}, recalibrated")
    axis.set_xticks(results["epochs"])
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation accuracy (eval mode)")
    axis.legend(fontsize="small")
    config = results["config"]
    title(figure, results, f"{data_size(results)}, batch {config['batch_size']}, "
                           f"{config['recalibration_batches']} recalibration batches")
    return [save(figure, out, "recalibrate.png")]


def table(results: dict[str, Any]) -> str:
    rows = []
    for momentum in results["momenta"]:
        name = _run_name(momentum)
        before = results["val_acc"][name][-1]
        after = results["val_acc_recalibrated"][name][-1]
        rows.append((momentum, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}"))
    return markdown_table(["BN momentum", "val acc (running stats)", "val acc (recalibrated)",
                           "change"], rows)


EXPERIMENT = Experiment(
    name="recalibrate",
    description="Precise BN statistics (recalibrate) vs the running average, for BN "
                "momenta up to 1 (Wu & Johnson 2021).",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
