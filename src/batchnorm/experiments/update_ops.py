"""update-ops: the TensorFlow 1 bug where the moving statistics are never updated.

In TF1, ``tf.layers.batch_normalization`` only updates its moving mean and variance when
the ``UPDATE_OPS`` collection is run with the train op; forgetting it leaves them at their
initial 0 and 1. Training looks fine (batch statistics), but inference uses the stale
moving statistics. A 7-layer leaky-ReLU MLP (784-1024-512-512-512-256-64-10) with BN and
Adam is trained twice, normally and with the statistics frozen (momentum 0), and both are
evaluated per epoch in eval mode and, for contrast, in train mode.
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

# run name -> momentum of the running statistics
VARIANTS = {"updated": 0.1, "never_updated": 0.0}
LABELS = {"updated": "statistics updated", "never_updated": "statistics never updated"}


@dataclass(frozen=True)
class Config:
    hidden: tuple[int, ...] = (1024, 512, 512, 512, 256, 64)
    batch_size: int = 100
    epochs: int = 5
    learning_rate: float = 1e-3


TINY = Config(hidden=(32, 16), batch_size=50, epochs=2)


def runs(config: Config, data: Split, seed: int) -> list[Run]:
    sizes = [data.train_x[0].numel(), *config.hidden, 10]
    metrics = {"eval_acc": partial(accuracy, x=data.val_x, y=data.val_y),
               "train_mode_acc": partial(accuracy, x=data.val_x, y=data.val_y,
                                         train_mode=True, batch_size=config.batch_size)}
    (run_seed,) = run_seeds(seed, 1)
    return [Run(name=name, seed=run_seed,
                build=partial(mlp, sizes, "leaky_relu",
                              norm=partial(norm_layer, "bn", momentum=momentum)),
                optimizer=partial(torch.optim.Adam, lr=config.learning_rate),
                train_x=data.train_x, train_y=data.train_y,
                batch_size=config.batch_size, records=config.epochs,
                steps_per_record=len(data.train_x) // config.batch_size, metrics=metrics)
            for name, momentum in VARIANTS.items()]


def report(config: Config, histories: dict[str, History], seed: int) -> dict[str, Any]:
    return {"epochs": list(range(1, config.epochs + 1)),
            "val_acc": {name: histories[name] for name in VARIANTS}}


def plot(results: dict[str, Any], out: Path) -> list[str]:
    figure, (axis,) = subplots(1, 1, size=(5.5, 3.8))
    for index, name in enumerate(VARIANTS):
        color = f"C{index}"
        curves = results["val_acc"][name]
        axis.plot(results["epochs"], curves["eval_acc"], color=color, marker=".",
                  label=f"{LABELS[name]}, eval mode")
        axis.plot(results["epochs"], curves["train_mode_acc"], "--", color=color,
                  label=f"{LABELS[name]}, train mode")
    epoch_axis(axis)
    axis.set_ylabel("validation accuracy")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize="small")
    config = results["config"]
    title(figure, results, f"{data_size(results)}, batch {config['batch_size']}, Adam lr "
                           f"{config['learning_rate']}")
    return [save(figure, out, "update_ops.png")]


def table(results: dict[str, Any]) -> str:
    rows = []
    for name in VARIANTS:
        curves = results["val_acc"][name]
        rows.append((LABELS[name], f"{curves['eval_acc'][-1]:.4f}",
                     f"{curves['train_mode_acc'][-1]:.4f}"))
    return ("Final validation accuracy:\n\n"
            + markdown_table(["run", "eval mode", "train mode"], rows))


EXPERIMENT = Experiment(
    name="update-ops",
    description="7-layer BN MLP with the moving statistics updated vs never updated "
                "(the TF1 UPDATE_OPS bug).",
    config=Config(), tiny=TINY, runs=runs, report=report, plot=plot, table=table)
