"""``batchnorm`` command line: each subcommand lives with the code it drives.

Exit status: 0 done; 1 a check found problems (doctor, data check); 2 the command could
not run (bad arguments, a missing or unusable file: one ``error:`` line, no traceback
unless --debug); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from batchnorm import __version__
from batchnorm.errors import InputError

# subcommand -> (module:function taking argv, one-line help)
COMMANDS = {
    "demo": ("batchnorm.demo:main", "the main job: BN vs no BN over 16 weight scales, with plots"),
    "experiment": ("batchnorm.experiments.cli:main", "run a classic BN experiment (list: names)"),
    "data": ("batchnorm.data.cli:main", "download MNIST / Fashion-MNIST, or check the files"),
    "doctor": ("batchnorm.tools.cli:doctor_main", "find BatchNorm bugs in a saved model"),
    "fold": ("batchnorm.tools.cli:fold_main", "fold BatchNorm into conv/linear layers"),
    "bench": ("batchnorm.bench:main", "benchmark suite: ours vs torch eager vs torch.compile"),
}
# top-level modules of the optional 'experiments' dependencies (pyproject.toml)
EXTRAS = ("matplotlib", "tqdm", "sklearn")
USAGE_ERROR, INTERRUPTED = 2, 130


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="batchnorm", usage="batchnorm [--version] [--debug] COMMAND [ARGS...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{commands}\n\n'batchnorm COMMAND --help' describes one.")
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after COMMAND)")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND",
                        help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    first = next((index for index, arg in enumerate(argv) if not arg.startswith("-")),
                 len(argv))
    parser = _parser()
    parsed = parser.parse_args(argv[:first + 1])
    if parsed.command is None:
        parser.print_help()
        return 0
    target, _ = COMMANDS[parsed.command]
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in EXTRAS:
            raise
        parser.exit(USAGE_ERROR, f"batchnorm {parsed.command} needs the 'experiments' extra "
                                 f"(missing module {error.name!r}): pip install "
                                 "'batchnorm[experiments]'\n")
    try:
        return int(getattr(module, function_name)(argv[first + 1:]) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nbatchnorm {parsed.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (OSError, InputError) as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the exception holds
        print(f"batchnorm {parsed.command}: error: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
