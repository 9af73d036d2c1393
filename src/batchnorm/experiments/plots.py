"""Figure helpers shared by the experiments (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def subplots(rows: int, cols: int, size: tuple[float, float] = (4.0, 3.0), **options: object
             ) -> tuple[Figure, Sequence]:
    figure, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                                squeeze=False, **options)
    return figure, axes.ravel()


def epoch_axis(axis: Axes) -> None:
    """Label the x axis "epoch", with whole-number ticks."""
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(figure: Figure, out: Path, name: str) -> str:
    """Write ``figure`` as ``out/name`` and return ``name``."""
    figure.tight_layout()
    figure.savefig(out / name, dpi=100)
    plt.close(figure)
    return name


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
