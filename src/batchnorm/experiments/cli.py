"""``batchnorm experiment NAME``: run one experiment into an output folder, resuming from
its checkpoint when interrupted; ``batchnorm experiment list`` names them all."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from batchnorm.data import DataFallbackWarning, Split, default_data_dir, load_split
from batchnorm.experiments.base import run_experiment
from batchnorm.experiments.registry import EXPERIMENTS


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/NAME)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding mnist/ (default: $BATCHNORM_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; these models are small, so 1 is usually fastest")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_data(dataset: str, data_dir: Path | None) -> Split:
    """The split to train on; the bundled digits when the dataset's files are missing.
    Without ``data_dir``: ``$BATCHNORM_DATA``, else ``../shared/data`` when it exists."""
    if data_dir is None:
        shared = Path("..") / "shared" / "data"
        data_dir = default_data_dir(default=shared if shared.is_dir() else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataFallbackWarning)  # its note is printed below
        data = load_split(dataset, data_dir=data_dir, download=False, fallback=True)
    print(f"data: {data.name} from {data.source}" + (f" ({data.note})" if data.note else ""))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm experiment", description=__doc__)
    parser.add_argument("name", choices=["list", *EXPERIMENTS], metavar="NAME",
                        help="list, or one of: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--dataset", default="mnist",
                        choices=["mnist", "fashion-mnist", "digits"])
    parser.add_argument("--tiny", action="store_true",
                        help="a configuration that runs in seconds (smoke test)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.name == "list":
        width = max(map(len, EXPERIMENTS))
        for name, experiment in EXPERIMENTS.items():
            print(f"{name:<{width}}  {experiment.description}")
        return 0
    experiment = EXPERIMENTS[args.name]
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / experiment.name
    data = load_data(args.dataset, args.data_dir) if experiment.needs_data else None
    start = time.perf_counter()
    run_experiment(experiment, out, data=data, seed=args.seed,
                   config=experiment.tiny if args.tiny else None,
                   progress=not args.no_progress)
    print(f"{experiment.name}: {time.perf_counter() - start:.1f} s; results in {out}/ "
          "(results.json, summary.md, *.png)")
    return 0
