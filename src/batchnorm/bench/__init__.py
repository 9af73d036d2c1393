"""``batchnorm bench``: single layers (ours vs torch eager vs torch.compile vs roofline),
end-to-end training steps of real architectures (torch.nn vs batchnorm.convert, eager
and compiled, NCHW and channels_last), an MNIST epoch, fold and SyncBatchNorm rows.

Writes ``results.json`` (diffable between commits) and ``results.md`` to ``--out`` and
prints the markdown. Every ratio comes from interleaved rounds and carries the spread of
its per-round values; a row whose rounds disagree by more than ``--margin`` is marked
instead of reported as a measurement. torch.compile is finished before timing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from batchnorm import kernels
from batchnorm.bench import cnn, fold, measure, report, syncbn, training
from batchnorm.bench.cases import SUITE, TINY, Case

SECTIONS = ("layers", "models", "epoch", "fold", "syncbn")


@dataclass(frozen=True)
class Settings:
    """How every section is timed (from the command line)."""

    rounds: dict[str, int]
    warmup: int
    min_round_s: dict[str, float]
    limits: measure.Limits


def machine() -> dict[str, object]:
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    primitives = kernels.primitives(torch.zeros(1))
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_kernels": primitives.__name__.rsplit(".", 1)[-1],
            "python": platform.python_version()}


def allocation_note(keep_freed_memory: bool) -> str:
    """How large outputs get and write their memory: the main cost of the largest cases."""
    note = ("freed memory kept mapped (--keep-freed-memory)" if keep_freed_memory
            else "default glibc allocator (outputs over 32 MiB page-fault on every call); "
                 "our CPU kernels' outputs of 128 KiB or more reuse the memory of freed ones")
    note += ("; our BatchNorm outputs the size of the last-level cache or more are written "
             "with non-temporal stores")
    settings = [f"{name}={os.environ[name]}" for name in
                ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "BATCHNORM_OUTPUT_CACHE_MB", "BATCHNORM_STREAM_MB") if name in os.environ]
    return note + "".join(f", {setting}" for setting in settings)


def _copy(numel: int) -> measure.Step:
    """``dst.copy_(src)`` of ``numel`` float32 values: one read and one write pass."""
    src = torch.ones(numel)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def run_case(case: Case, settings: Settings, compiler: measure.Compiler
             ) -> dict[str, object]:
    """One single-layer row: ours, the baseline and (compile enabled) torch.compile of the
    torch layer, on ``case.threads`` threads; a copy of the input's size runs in the same
    rounds, so the roofline takes the bandwidth of the moment (it drifts on a shared
    machine) rather than one measured at the start."""
    numel = torch.Size(case.shape).numel()
    with measure.num_threads(case.threads):
        steps = {"ours": case.step(case.build(case.ours)),
                 "baseline": case.step(case.build(case.theirs)), "copy": _copy(numel)}
        compiled, notes = compiler.warm_up({"compile": lambda: case.step(
            compiler.compile(case.build(case.compiled or case.theirs)))})
        steps.update(compiled)
        timed = measure.interleaved_rounds(steps, settings.rounds["layers"], settings.warmup,
                                           settings.min_round_s["layers"])
        threads = torch.get_num_threads()
    pass_ms = timed.ms("copy") / 2
    bandwidth = numel * 4 / (pass_ms / 1e3)
    ours_over_pass = timed.compare("ours", "copy", settings.limits)
    return {"group": case.group, "case": case.name, "shape": list(case.shape),
            "mode": case.mode, "layout": case.layout, "threads": threads,
            "baseline": case.baseline, "load_1min": timed.load_1min,
            "cpu_wait": timed.cpu_wait,
            "ours_ms": timed.ms("ours"), "baseline_ms": timed.ms("baseline"),
            "compile_ms": timed.ms("compile"), "compile_note": notes["compile"],
            "speedup": timed.compare("baseline", "ours", settings.limits),
            "vs_compile": timed.compare("compile", "ours", settings.limits),
            "graphs_compiled_while_timing": timed.graphs_compiled,
            "shape_bytes": numel * 4, "copy_bandwidth_gbs": bandwidth / 1e9,
            "roofline_passes": case.passes,
            "roofline_ms": case.passes * pass_ms,
            "ours_over_roofline": _scaled(ours_over_pass, 2 / case.passes),
            "bound_passes": case.bound_passes,
            "ours_over_bound": None if case.bound_passes is None else
            _scaled(ours_over_pass, 2 / case.bound_passes),
            "rounds_ms": timed.rounds_ms()}


def _scaled(comparison: dict[str, object], factor: float) -> dict[str, object]:
    """A :func:`measure.compare` result with its ratio and range multiplied by ``factor``
    (ours over one copy's time, as ours over ``1 / factor`` copies)."""
    return {**comparison, **{key: comparison[key] * factor for key in ("ratio", "low", "high")}}


def run_layers(cases: list[Case], settings: Settings, compiler: measure.Compiler
               ) -> list[dict[str, object]]:
    rows = []
    for case in cases:
        rows.append(run_case(case, settings, compiler))
        print(f"{case.label}: ours {rows[-1]['ours_ms']:.3f} ms, {case.baseline} "
              f"{rows[-1]['baseline_ms']:.3f} ms", flush=True)
    return rows


def run_models(cases: list[training.ModelCase], settings: Settings,
               compiler: measure.Compiler) -> list[dict[str, object]]:
    return training.run_all(cases, compiler, settings.rounds["models"], settings.warmup,
                            settings.min_round_s["models"], settings.limits)


def _device_and_rest(argv: list[str] | None) -> tuple[str, list[str]]:
    """``--device``, and every other argument, for the suite of that device to parse whole
    (the two suites share flag names, such as --no-compile, with their own meanings)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    known, rest = parser.parse_known_args(argv)
    return known.device, rest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CPU suite's arguments."""
    parser = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for results.json and results.md")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU suite of batchnorm.bench.cuda, which takes the "
                        "other arguments (see `batchnorm bench --device cuda --help`)")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of short calls (smoke test)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and narrowed models of the same structure; no "
                        "MNIST epoch, no SyncBatchNorm")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--filter", default="", help="only single-layer cases whose name or "
                        "shape, and models whose name, contain this substring")
    parser.add_argument("--rounds", type=int, help="timed rounds per row (at least 3; "
                        "default 15 for single layers and 7 for models, 3 with --quick)")
    parser.add_argument("--margin", type=float, default=measure.DEFAULT_MARGIN,
                        help="largest spread of the per-round ratios (interquartile range "
                        "over median) still reported as a measurement (default %(default)s)")
    parser.add_argument("--max-cpu-wait", type=float, default=measure.DEFAULT_MAX_CPU_WAIT,
                        help="largest share of the timed threads' time spent waiting for a "
                        "CPU still reported as a measurement (default %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default %(default)s)")
    parser.add_argument("--compile-budget", type=float, default=300.0,
                        help="seconds of torch.compile allowed per section (single layers, "
                        "models; default %(default)s)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory mapped (glibc mallopt) to take page faults "
                        "on fresh large outputs out of every competitor's time")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("BATCHNORM_DATA", "../shared/data")),
                        help="directory holding mnist/ (epoch row; skipped if absent)")
    args = parser.parse_args(argv)
    sections = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections expects a comma-separated subset of {','.join(SECTIONS)}, "
                     f"got {args.sections!r}")
    args.sections = sections
    if args.rounds is not None and args.rounds < 3:
        parser.error(f"--rounds must be at least 3 (a spread needs rounds), got {args.rounds}")
    for name in ("margin", "max_cpu_wait"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, "
                         f"got {getattr(args, name)}")
    return args


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        rounds, warmup, min_round_s = {"layers": 3, "models": 3}, 1, {"layers": 0.005,
                                                                       "models": 0.005}
    else:
        rounds, warmup, min_round_s = {"layers": 15, "models": 7}, 2, {"layers": 0.05,
                                                                        "models": 0.2}
    if args.rounds is not None:
        rounds = dict.fromkeys(rounds, args.rounds)
    return Settings(rounds, warmup, min_round_s, measure.Limits(args.margin, args.max_cpu_wait))


def _epoch(args: argparse.Namespace, settings: Settings) -> dict[str, object]:
    data = cnn.load_mnist_test(args.data)
    if data is None:
        return {"note": f"skipped: no MNIST files under {args.data}/mnist"}
    return cnn.time_epochs(*data, rounds=2 if args.quick else 3, limits=settings.limits)


def main(argv: list[str] | None = None) -> int:
    device, rest = _device_and_rest(argv)
    if device == "cuda":
        from batchnorm.bench import cuda
        return cuda.main(rest)
    args = parse_args(argv)
    settings = _settings(args)
    cases = [case for case in (TINY if args.tiny else SUITE) if args.filter in case.label]
    model_cases = [case for case in (training.TINY_MODELS if args.tiny else training.MODELS)
                   if args.filter in case.name]
    if args.filter and not (cases or model_cases):
        raise SystemExit(f"--filter {args.filter!r} matches no case or model")
    if args.keep_freed_memory:
        measure.keep_freed_memory()
    info = machine()
    load_before = measure.load_average()
    start = time.perf_counter()
    bandwidth = measure.copy_bandwidth(16 if args.tiny else 256)
    budget = None if args.no_compile else args.compile_budget
    runners: dict[str, Callable[[], object]] = {
        "layers": lambda: run_layers(cases, settings,
                                     measure.Compiler(budget, args.compile_backend)),
        "models": lambda: run_models(model_cases, settings,
                                     measure.Compiler(budget, args.compile_backend)),
        "epoch": lambda: _epoch(args, settings),
        "fold": lambda: fold.measure(quick=args.quick or args.tiny, limits=settings.limits),
        "syncbn": lambda: syncbn.measure(quick=args.quick, limits=settings.limits)}
    results: dict[str, object] = {}
    section_wall_s: dict[str, float] = {}
    with measure.compile_in_process():
        for name, run in runners.items():
            skipped = "--sections" if name not in args.sections else \
                "--tiny" if args.tiny and name in ("epoch", "syncbn") else None
            if skipped:
                results[name] = [] if name in ("layers", "models") else \
                    {"note": f"skipped ({skipped})"}
                continue
            began = time.perf_counter()
            results[name] = run()
            section_wall_s[name] = time.perf_counter() - began
    info["load_average"] = {"before": load_before, "after": measure.load_average()}
    layers, models = results["layers"], results["models"]
    report_data = {
        "machine": info, "copy_bandwidth_gbs": bandwidth / 1e9,
        "settings": {"rounds": settings.rounds, "warmup": settings.warmup,
                     "min_round_ms": {name: 1e3 * value
                                      for name, value in settings.min_round_s.items()},
                     "margin": settings.limits.margin,
                     "max_cpu_wait": settings.limits.max_cpu_wait,
                     "compile_backend": None if args.no_compile else args.compile_backend,
                     "compile_budget_s": args.compile_budget,
                     "allocator": allocation_note(args.keep_freed_memory)},
        "layers": layers,
        "layers_summary": report.summarize(layers, lambda row: (row["group"],), ("group",)),
        "models": models,
        "models_summary": report.summarize(models, lambda row: (row["mode"], row["layout"]),
                                           ("mode", "layout")),
        "mnist_epoch": results["epoch"], "fold": results["fold"],
        "syncbn": results["syncbn"],
        "section_wall_s": section_wall_s, "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report_data, indent=2) + "\n")
    text = report.markdown(report_data)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0
