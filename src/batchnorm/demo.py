"""``batchnorm demo``: the main job. BatchNorm vs no BatchNorm over 16 weight scales
(the ``init-sweep`` experiment) on MNIST when found, else on the bundled digits; prints
the path of the 4x4 figure and the final train accuracies."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from batchnorm.experiments import init_sweep
from batchnorm.experiments.base import run_experiment
from batchnorm.experiments.cli import add_common_arguments, load_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm demo", description=__doc__)
    parser.add_argument("--dataset", default="mnist",
                        choices=["mnist", "fashion-mnist", "digits"])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / "demo"
    start = time.perf_counter()
    data = load_data(args.dataset, args.data_dir)
    results = run_experiment(init_sweep.EXPERIMENT, out, data=data, seed=args.seed,
                             progress=not args.no_progress)
    seconds = time.perf_counter() - start
    rows = init_sweep.final_accuracies(results)
    print(f"\nfinal train accuracy after {results['updates'][-1]} updates "
          f"({len(results['scales'])} weight scales, {data.name}):")
    print(f"{'weight scale':>12}  {'BN':>6}  {'no BN':>6}")
    for scale, bn, no_bn in rows:
        print(f"{scale:>12.3g}  {bn:>6.3f}  {no_bn:>6.3f}")
    wins = sum(bn > no_bn for _, bn, no_bn in rows)
    print(f"BN beats no BN at {wins} of {len(rows)} scales; {seconds:.1f} s")
    print(f"figure: {out / 'init_sweep.png'}")
    return 0
