"""``batchnorm`` command line: each subcommand lives with the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module:function taking argv, one-line help)
COMMANDS = {
    "demo": ("batchnorm.demo:main", "the main job: BN vs no BN on real data, with plots"),
    "bench": ("batchnorm.bench:main", "benchmark suite: ours vs torch eager vs torch.compile"),
    "experiment": ("batchnorm.experiments.cli:main", "run a classic BN experiment"),
    "doctor": ("batchnorm.tools.cli:doctor_main", "find BatchNorm bugs in a saved model"),
    "fold": ("batchnorm.tools.cli:fold_main", "fold BatchNorm into conv/linear layers"),
}
# top-level modules of the optional 'experiments' dependencies (pyproject.toml)
EXTRAS = ("matplotlib", "tqdm", "sklearn")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parsed = parser.parse_args(argv[:1])
    target, _ = COMMANDS[parsed.command]
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in EXTRAS:
            raise
        parser.exit(2, f"batchnorm {parsed.command} needs the 'experiments' extra (missing "
                       f"module {error.name!r}): pip install 'batchnorm[experiments]'\n")
    return int(getattr(module, function_name)(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
