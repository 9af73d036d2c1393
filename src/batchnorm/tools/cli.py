"""``batchnorm doctor`` and ``batchnorm fold``: the tools on a saved model."""

from __future__ import annotations

import argparse
import importlib
import os

import torch
from torch import nn

from batchnorm.tools.doctor import Finding, doctor
from batchnorm.tools.fold import fold

MODEL_HELP = ("a model saved with torch.save(model, path) — loading it UNPICKLES the file, "
              "which can run arbitrary code: only use files you trust — or "
              "'package.module:factory', a function called without arguments that returns "
              "the model")


def load_model(spec: str) -> nn.Module:
    """The model named by ``spec``: a ``torch.save``d module file or ``module:factory``."""
    if not os.path.exists(spec) and ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        model = getattr(importlib.import_module(module_name), factory_name)()
    else:
        model = torch.load(spec, weights_only=False, map_location="cpu")
    if not isinstance(model, nn.Module):
        raise SystemExit(f"error: MODEL {spec!r} must hold a torch.nn.Module, got "
                         f"{type(model).__name__} (a state_dict needs its model class: save "
                         "the whole module or give 'package.module:factory')")
    return model


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
        description="Find BatchNorm bugs in a model. Exit status 1 if any error is found.")
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--batch", metavar="FILE",
                        help="a tensor (or (input, target) tuple) saved with torch.save: "
                             "enables the train/eval gap and values-per-channel checks")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    batch = None if args.batch is None else torch.load(args.batch, weights_only=True)
    findings = doctor(model, batch)
    print(format_findings(findings))
    return int(any(finding.severity == "error" for finding in findings))


def fold_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm fold",
        description="Fold BatchNorm layers into the conv/linear layers before them and save "
                    "the inference model (load it with torch.load(path, weights_only=False)).")
    parser.add_argument("model", metavar="IN", help=MODEL_HELP)
    parser.add_argument("output", metavar="OUT", help="where to torch.save the folded model")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    folded = fold(model)
    torch.save(folded, args.output)
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    print(f"saved {args.output}: BatchNorm layers {before} -> {after} (the rest folded into "
          "conv/linear layers or frozen into affines)")
    return 0
