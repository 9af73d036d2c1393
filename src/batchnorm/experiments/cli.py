"""``batchnorm experiment NAME``: run one experiment into an output folder, resuming from
its checkpoint when interrupted; ``batchnorm experiment list`` names them all."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from batchnorm.cli import INTERRUPTED
from batchnorm.data import Split, load_requested_split
from batchnorm.data.datasets import NAMES
from batchnorm.experiments.base import CHECKPOINT, Experiment, run_experiment
from batchnorm.experiments.registry import EXPERIMENTS

DATASET_HELP = ("dataset to train on (default: MNIST when its files are in the data folder, "
                "else scikit-learn's bundled 8x8 digits, and it says so; a dataset or "
                "--data-dir you name must be there)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --data-dir, --out, --seed, --restart, --threads, --no-progress."""
    parser.add_argument("--dataset", default=None, choices=NAMES, help=DATASET_HELP)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding mnist/ (default: $BATCHNORM_DATA, else "
                             "~/.cache/batchnorm; `batchnorm data fetch mnist` fills it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/NAME)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true",
                        help="discard the checkpoint in --out and train everything again")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; these models are small, so 1 is usually fastest")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_common(parser: argparse.ArgumentParser, argv: list[str] | None
                 ) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def load_data(dataset: str | None, data_dir: Path | None) -> Split:
    """The split to train on (see :func:`batchnorm.data.load_requested_split`), announced."""
    data = load_requested_split(dataset, data_dir)
    print(f"data: {data.name} from {data.source}" + (f" ({data.note})" if data.note else ""))
    return data


def run(experiment: Experiment, args: argparse.Namespace, out: Path,
        config: Any = None) -> dict[str, Any] | int:
    """Run ``experiment`` as the common arguments say; Ctrl-C keeps the checkpoint, says
    how to resume and returns the exit status 130 instead of results."""
    torch.set_num_threads(args.threads)
    data = load_data(args.dataset, args.data_dir) if experiment.needs_data else None
    try:
        return run_experiment(experiment, out, data=data, seed=args.seed, config=config,
                              progress=not args.no_progress, restart=args.restart)
    except KeyboardInterrupt:
        checkpoint = out / CHECKPOINT
        kept = (f"the checkpoint {checkpoint} is kept: run the same command again to resume"
                if checkpoint.exists() else "nothing was saved yet")
        print(f"\n{experiment.name}: interrupted; {kept}", file=sys.stderr)
        return INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm experiment", description=__doc__)
    parser.add_argument("name", choices=["list", *EXPERIMENTS], metavar="NAME",
                        help="list, or one of: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--tiny", action="store_true",
                        help="a configuration that runs in seconds (smoke test)")
    add_common_arguments(parser)
    args = parse_common(parser, argv)
    if args.name == "list":
        width = max(map(len, EXPERIMENTS))
        for name, experiment in EXPERIMENTS.items():
            print(f"{name:<{width}}  {experiment.description}")
        return 0
    experiment = EXPERIMENTS[args.name]
    out = args.out or Path("runs") / experiment.name
    start = time.perf_counter()
    results = run(experiment, args, out, config=experiment.tiny if args.tiny else None)
    if isinstance(results, int):
        return results
    print(f"{experiment.name}: {time.perf_counter() - start:.1f} s; results in {out}/ "
          "(results.json, summary.md, *.png)")
    return 0
