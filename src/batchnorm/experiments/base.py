"""What an experiment is (a config plus four small functions) and the runner that turns
one into ``results.json``, PNG figures and ``summary.md``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchnorm.experiments.atomic import write_text_atomic
from batchnorm.experiments.loop import History, RecordHook, Run, train_runs

if TYPE_CHECKING:
    from batchnorm.data import Split

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Experiment:
    """A named experiment: ``runs`` says what to train, ``report`` turns the histories into
    the results, ``plot`` draws them into PNG files (returning their names) and ``table``
    is the Markdown table of ``summary.md``. ``tiny`` is a configuration that runs in
    seconds, for tests."""

    name: str
    description: str
    config: Any
    tiny: Any
    runs: Callable[[Any, Split | None, int], list[Run]]
    report: Callable[[Any, dict[str, History], int], dict[str, Any]]
    plot: Callable[[dict[str, Any], Path], list[str]]
    table: Callable[[dict[str, Any]], str]
    needs_data: bool = True


def _data_info(data: Split | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"name": data.name, "source": data.source, "note": data.note,
            "train": len(data.train_x), "val": len(data.val_x),
            "image_shape": list(data.train_x.shape[1:])}


def run_experiment(experiment: Experiment, out_dir: str | os.PathLike[str], *,
                   data: Split | None = None, seed: int = 0, config: Any = None,
                   progress: bool = True, on_record: RecordHook | None = None,
                   restart: bool = False) -> dict[str, Any]:
    """Run (or resume) ``experiment`` into ``out_dir`` and return its results.

    ``config`` defaults to the experiment's full configuration; ``data`` is required when
    the experiment trains. The same seed, configuration and data give a byte-identical
    ``results.json``, whether or not the run was interrupted and resumed. ``restart``
    deletes the checkpoint first, so everything is trained again."""
    config = experiment.config if config is None else config
    if experiment.needs_data and data is None:
        raise ValueError(f"experiment {experiment.name!r} trains a model: data must be a "
                         "loaded split, got None")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        (out / CHECKPOINT).unlink(missing_ok=True)
    header = {"experiment": experiment.name, "seed": seed, "config": dataclasses.asdict(config),
              "data": _data_info(data)}
    runs = experiment.runs(config, data, seed)
    histories = {}
    if runs:
        histories = train_runs(runs, out / CHECKPOINT, header, progress=progress,
                               desc=experiment.name, on_record=on_record)
    text = json.dumps({**header, **experiment.report(config, histories, seed)}, indent=2)
    write_text_atomic(out / "results.json", text + "\n")
    results = json.loads(text)  # what readers of results.json see: lists, not tuples
    figures = experiment.plot(results, out)
    data_line = "" if data is None else f"Data: {data.name} ({data.source}). {data.note}\n\n"
    summary = (f"# {experiment.name}\n\n{experiment.description}\n\n{data_line}"
               f"Seed {seed}.\n\n{experiment.table(results)}\n\n"
               + "\n".join(f"![{name}]({name})" for name in figures) + "\n")
    write_text_atomic(out / "summary.md", summary)
    return results
