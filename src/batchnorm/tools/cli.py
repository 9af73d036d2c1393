"""``batchnorm doctor`` and ``batchnorm fold``: the tools on a saved model.

Files are read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors
and plain containers, so a file cannot run code while it loads. A model therefore comes
from a factory (``package.module:function``), optionally with ``--weights`` (its
``state_dict``); a whole pickled module needs ``--allow-pickle``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.errors import FileContentError, InputError
from batchnorm.tools.doctor import Finding, doctor
from batchnorm.tools.fold import fold

FOUND_PROBLEMS = 1
MODEL_HELP = ("'package.module:function', called without arguments to build the model (then "
              "--weights loads its state_dict), or a file holding a whole pickled model "
              "(torch.save(model, path)), which needs --allow-pickle")
WEIGHTS_HELP = "a state_dict saved with torch.save(model.state_dict(), path), loaded into MODEL"
ALLOW_PICKLE_HELP = ("load a MODEL file with full unpickling (torch.load(weights_only=False)): "
                     "the file can then run ANY code on this machine as it loads. Only for "
                     "files you made or trust; a state_dict with --weights never needs it")


def _read(path: str, what: str, allow_pickle: bool = False) -> Any:
    """``torch.load`` of a file the user named, failures as one-line errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    try:
        return torch.load(path, weights_only=not allow_pickle, map_location="cpu")
    except Exception as error:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if not allow_pickle and unsupported:
            raise FileContentError(
                path, f"{what} is a pickle that would call {unsupported.group(1)} as it "
                      "loads (pickles can run code)",
                "tensors and plain containers (a state_dict, a tensor)", "a pickled object",
                hint="give the model as 'package.module:function' with --weights FILE for a "
                     "state_dict, or pass --allow-pickle if you trust the file") from None
        first = (str(error).strip().splitlines() or [""])[0]
        raise FileContentError(path, f"unreadable {what}", "a file written by torch.save",
                               f"{type(error).__name__}: {first[:200]}") from None


def _factory(spec: str) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"MODEL {spec!r}: cannot import module {module_name!r}: {error}"
                         ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"MODEL {spec!r}: module {module_name!r} has no function "
                         f"{function_name!r}")
    return function()


def load_model(spec: str, weights: str | None = None, allow_pickle: bool = False) -> nn.Module:
    """The model named by ``spec`` (a ``module:function`` factory, or with
    ``allow_pickle`` a ``torch.save``d module file), with ``weights`` loaded into it."""
    is_file = os.path.exists(spec)
    if not is_file and ":" in spec:
        model = _factory(spec)
    elif not is_file:
        raise FileNotFoundError(f"MODEL {spec!r}: no such file, and not a "
                                "'package.module:function' spec")
    else:
        model = _read(spec, "MODEL file", allow_pickle)
        if isinstance(model, Mapping):
            raise FileContentError(spec, "MODEL file holds a state_dict, not a model",
                                   "a pickled torch.nn.Module", "a state_dict",
                                   hint="give its model as 'package.module:function' and "
                                        "the file as --weights")
    if not isinstance(model, nn.Module):
        raise FileContentError(spec, "MODEL is not a model", "a torch.nn.Module",
                               type(model).__name__)
    if weights is not None:
        state = _read(weights, "--weights file")
        if not isinstance(state, Mapping):
            raise FileContentError(weights, "not a state_dict", "a dict of tensors",
                                   type(state).__name__)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise FileContentError(weights, "state_dict does not fit MODEL",
                                   f"the keys and shapes of {spec}", first) from None
    return model


def _read_batch(path: str) -> Tensor | tuple[Tensor, ...]:
    batch = _read(path, "--batch file")
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        return tuple(batch)
    raise FileContentError(path, "not a batch", "a tensor or an (input, target) tuple",
                           type(batch).__name__)


def add_model_arguments(parser: argparse.ArgumentParser, metavar: str) -> None:
    parser.add_argument("model", metavar=metavar, help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", help=WEIGHTS_HELP)
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def format_findings(findings: list[Finding]) -> str:
    """Findings as an aligned text table (severity, code, layer, message, fix)."""
    if not findings:
        return "no BatchNorm problems found"
    rows = [("SEVERITY", "CODE", "LAYER", "MESSAGE / FIX")]
    for finding in findings:
        rows.append((finding.severity, finding.code, finding.layer or "<model>",
                     finding.message))
        rows.append(("", "", "", f"fix: {finding.fix}"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)),
                        row[3]]).rstrip() for row in rows]
    return "\n".join(lines)


def doctor_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm doctor",
        description="Find BatchNorm bugs in a model. Exit status: 0 no errors found, "
                    f"{FOUND_PROBLEMS} errors found, 2 could not run (bad arguments or files).")
    add_model_arguments(parser, "MODEL")
    parser.add_argument("--batch", metavar="FILE",
                        help="a tensor (or (input, target) tuple) saved with torch.save: "
                             "enables the train/eval gap and values-per-channel checks")
    args = parser.parse_args(argv)
    model = load_model(args.model, args.weights, args.allow_pickle)
    batch = None if args.batch is None else _read_batch(args.batch)
    try:
        findings = doctor(model, batch)
    except RuntimeError as error:
        if batch is None:
            raise
        raise InputError(f"--batch {args.batch}: {error}") from None
    print(format_findings(findings))
    return FOUND_PROBLEMS if any(finding.severity == "error" for finding in findings) else 0


def fold_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm fold",
        description="Fold BatchNorm layers into the conv/linear layers before them and save "
                    "the inference model (a pickled module: load it with "
                    "torch.load(path, weights_only=False), as a file you made).")
    add_model_arguments(parser, "IN")
    parser.add_argument("output", metavar="OUT", help="where to torch.save the folded model")
    args = parser.parse_args(argv)
    model = load_model(args.model, args.weights, args.allow_pickle)
    folded = fold(model)
    torch.save(folded, args.output)
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    print(f"saved {args.output}: BatchNorm layers {before} -> {after} (the rest folded into "
          "conv/linear layers or frozen into affines)")
    return 0
