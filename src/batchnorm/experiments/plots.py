"""Figure helpers shared by the experiments (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from batchnorm.experiments.atomic import write_atomic


def subplots(rows: int, cols: int, size: tuple[float, float] = (4.0, 3.0), **options: object
             ) -> tuple[Figure, Sequence]:
    figure, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                                squeeze=False, **options)
    return figure, axes.ravel()


def epoch_axis(axis: Axes) -> None:
    """Label the x axis "epoch", with whole-number ticks."""
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def title(figure: Figure, results: dict[str, Any], settings: str) -> None:
    """Title ``figure`` with the experiment, the data it trained on and its key
    ``settings``, so that figures of different runs (e.g. digits and MNIST) differ."""
    data = results["data"]
    trained_on = "" if data is None else f" on {data['name']}"
    figure.suptitle(f"{results['experiment']}{trained_on}: {settings}, seed {results['seed']}",
                    fontsize="medium")


def data_size(results: dict[str, Any], train_size: int | None = None) -> str:
    """"N train / M validation images" of the run (``train_size`` when it trains on the
    first ``train_size`` only)."""
    data = results["data"]
    train = data["train"] if train_size is None else train_size
    return f"{train:,} train / {data['val']:,} validation images"


def save(figure: Figure, out: Path, name: str) -> str:
    """Write ``figure`` as ``out/name`` (atomically) and return ``name``."""
    figure.tight_layout()
    # "tight" keeps what sits outside the axes grid (a figure legend) in the picture
    write_atomic(out / name, lambda handle: figure.savefig(handle, format="png", dpi=100,
                                                           bbox_inches="tight"))
    plt.close(figure)
    return name


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
