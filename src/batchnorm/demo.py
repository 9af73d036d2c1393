"""``batchnorm demo``: the main job. BatchNorm vs no BatchNorm over 16 weight scales
(the ``init-sweep`` experiment: Deep Learning from Scratch, ch. 6.3) on MNIST when found,
else on the bundled digits; prints the path of the 4x4 figure and the final train
accuracies."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from batchnorm.experiments import init_sweep
from batchnorm.experiments.cli import add_common_arguments, parse_common, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm demo", description=__doc__)
    add_common_arguments(parser)
    args = parse_common(parser, argv)
    out = args.out or Path("runs") / "demo"
    start = time.perf_counter()
    results = run(init_sweep.EXPERIMENT, args, out)
    if isinstance(results, int):
        return results
    seconds = time.perf_counter() - start
    rows = init_sweep.final_accuracies(results)
    print(f"\nfinal train accuracy after {results['updates'][-1]} updates "
          f"({len(results['scales'])} weight scales, {results['data']['name']}, "
          f"first {results['config']['train_size']:,} training images):")
    print(f"{'weight scale':>12}  {'BN':>6}  {'no BN':>6}")
    for scale, bn, no_bn in rows:
        print(f"{scale:>12.3g}  {bn:>6.3f}  {no_bn:>6.3f}")
    wins = sum(bn > no_bn for _, bn, no_bn in rows)
    print(f"BN beats no BN at {wins} of {len(rows)} scales; {seconds:.1f} s")
    print(f"figure: {out / 'init_sweep.png'}")
    return 0
