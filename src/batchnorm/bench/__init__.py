"""``batchnorm bench``: the fixed suite, ours vs torch eager vs torch.compile vs roofline.

Writes ``results.json`` (diffable between commits) and ``results.md`` to ``--out`` and
prints the markdown. Ours is ``batchnorm.functional`` (so the default dispatch is what is
measured); the roofline is the case's minimal traffic over this run's copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numba
import torch

from batchnorm.bench import cnn, fold, measure, syncbn
from batchnorm.bench.cases import SUITE, TINY, Case


def machine() -> dict[str, object]:
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "torch": torch.__version__,
            "numba": numba.__version__, "python": platform.python_version(),
            "backend": os.environ.get("BATCHNORM_BACKEND", "default dispatch")}


def allocation_note(keep_freed_memory: bool) -> str:
    """How large outputs get their memory: the main cost of the largest cases."""
    note = ("freed memory kept mapped (--keep-freed-memory)" if keep_freed_memory
            else "default glibc allocator (outputs over 32 MiB page-fault on every call)")
    settings = [f"{name}={os.environ[name]}" for name in
                ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                if name in os.environ]
    return note + "".join(f", {setting}" for setting in settings)


def run_case(case: Case, bandwidth: float, rounds: int, warmup: int,
             compile_budget_s: float) -> dict[str, object]:
    inputs = case.inputs(torch.Generator().manual_seed(0))
    steps = {"ours": measure.step(case, case.ours, inputs),
             "baseline": measure.step(case, case.theirs, inputs)}
    compiled, compile_note = (None, "n/a (--no-compile)")
    if compile_budget_s is not None:
        compiled, compile_note = measure.compiled_step(case, inputs, compile_budget_s)
    if compiled is not None:
        steps["compile"] = compiled
    medians = measure.interleaved_medians(steps, rounds, warmup)
    roofline = case.passes * inputs[0].numel() * inputs[0].element_size() / bandwidth
    ours = medians["ours"]
    return {"family": case.family, "case": case.name, "shape": list(case.shape),
            "mode": case.mode, "baseline": case.baseline,
            "ours_ms": 1e3 * ours, "baseline_ms": 1e3 * medians["baseline"],
            "compile_ms": 1e3 * medians["compile"] if "compile" in medians else None,
            "compile_note": compile_note, "roofline_ms": 1e3 * roofline,
            "speedup": medians["baseline"] / ours,
            "speedup_vs_compile": medians["compile"] / ours if "compile" in medians else None,
            "ours_over_roofline": ours / roofline}


def geometric_mean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: list[dict[str, object]]) -> dict[str, object]:
    def speedups(*families: str) -> list[float]:
        return [row["speedup"] for row in rows if row["family"] in families]
    batch_norm = speedups("batch_norm")
    return {"batch_norm_geomean_speedup": geometric_mean(batch_norm),
            "batch_norm_min_speedup": min(batch_norm, default=None),
            "ln_gn_in_geomean_speedup": geometric_mean(
                speedups("layer_norm", "group_norm", "instance_norm")),
            "fused_relu_speedup": geometric_mean(speedups("fused"))}


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(report: dict[str, object]) -> str:
    info = report["machine"]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
             f"({info['torch_threads']} threads), numba {info['numba']} "
             f"({info['numba_threads']} threads), Python {info['python']}; "
             f"backend: {info['backend']}.",
             f"Copy bandwidth (read + write): {report['copy_bandwidth_gbs']:.1f} GB/s; "
             f"load average before / after: {report['load_before']} / {report['load_after']}; "
             f"{report['rounds']} interleaved rounds, median ms; {report['allocator']}.", "",
             "| case | shape | mode | ours ms | baseline | baseline ms | speedup | "
             "torch.compile ms | vs compile | roofline ms | ours / roofline |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        shape = "x".join(map(str, row["shape"]))
        compiled = _ms(row["compile_ms"]) if row["compile_ms"] is not None else row[
            "compile_note"]
        lines.append(f"| {row['case']} | {shape} | {row['mode']} | {_ms(row['ours_ms'])} | "
                     f"{row['baseline']} | {_ms(row['baseline_ms'])} | "
                     f"{_ratio(row['speedup'])} | {compiled} | "
                     f"{_ratio(row['speedup_vs_compile'])} | {_ms(row['roofline_ms'])} | "
                     f"{_ratio(row['ours_over_roofline'])} |")
    summary = report["summary"]
    lines += ["", f"BatchNorm geometric-mean speedup over torch eager: "
              f"{_ratio(summary['batch_norm_geomean_speedup'])} "
              f"(lowest {_ratio(summary['batch_norm_min_speedup'])}); "
              f"LayerNorm/GroupNorm/InstanceNorm: "
              f"{_ratio(summary['ln_gn_in_geomean_speedup'])}; "
              f"fused BN+ReLU vs BN then relu: {_ratio(summary['fused_relu_speedup'])}."]
    e2e = report["end_to_end"]
    if "ours_s" in e2e:
        lines.append(f"End to end, one epoch of a two conv+BN+ReLU block CNN on the 10,000 "
                     f"MNIST test images (batch {cnn.BATCH_SIZE}): ours {e2e['ours_s']:.2f} s, "
                     f"torch.nn {e2e['torch_s']:.2f} s "
                     f"({e2e['torch_s'] / e2e['ours_s']:.2f}x).")
    else:
        lines.append(f"End to end: {e2e['note']}")
    folding = report["fold"]
    lines.append(f"batchnorm.fold, eval forward of a {folding['model']} on "
                 f"{'x'.join(map(str, folding['input_shape']))}: torch.nn BN "
                 f"{_ms(folding['torch_bn_ms'])} ms, ours {_ms(folding['ours_bn_ms'])} ms, "
                 f"folded {_ms(folding['folded_ms'])} ms "
                 f"({_ratio(folding['speedup_vs_torch_bn'])} vs torch.nn BN; max abs "
                 f"difference {folding['max_abs_diff']:.1e}).")
    sync = report["syncbn"]
    if "ratio" in sync:
        lines.append(f"SyncBatchNorm on {sync['processes']} processes (gloo, "
                     f"{'x'.join(map(str, sync['shape']))} per process, train step): "
                     f"{_ms(sync['syncbn_ms'])} ms vs local BatchNorm2d "
                     f"{_ms(sync['local_ms'])} ms ({sync['ratio']:.2f}x); collectives per "
                     f"step: {sync['collectives_forward']} forward, "
                     f"{sync['collectives_backward']} backward.")
    else:
        lines.append(f"SyncBatchNorm: {sync['note']}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batchnorm bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes of the same structure instead of the suite")
    parser.add_argument("--filter", default="", help="only cases whose name or shape "
                        "contains this substring")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--compile-budget", type=float, default=240.0,
                        help="seconds of torch.compile allowed over the whole run")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory mapped (glibc mallopt) to take page faults "
                        "on fresh large outputs out of every competitor's time")
    parser.add_argument("--no-syncbn", action="store_true",
                        help="skip the SyncBatchNorm row (it starts 2 processes)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("BATCHNORM_DATA", "../shared/data")),
                        help="directory holding mnist/ (end-to-end row; skipped if absent)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds, warmup = (3, 1) if args.quick else (15, 2)
    cases = [case for case in (TINY if args.tiny else SUITE)
             if args.filter in f"{case.name} {'x'.join(map(str, case.shape))}"]
    if not cases:
        raise SystemExit(f"--filter {args.filter!r} matches no case")
    if args.keep_freed_memory:
        measure.keep_freed_memory()
    info = machine()  # before the fold row, whose timer runs single-threaded
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    bandwidth = measure.copy_bandwidth(16 if args.tiny else 256)
    rows = []
    budget = None if args.no_compile else args.compile_budget
    for case in cases:
        began = time.perf_counter()
        rows.append(run_case(case, bandwidth, rounds, warmup, budget))
        if budget is not None and rows[-1]["compile_ms"] is not None:
            budget -= time.perf_counter() - began
        print(f"{case.name} {case.shape}: ours {rows[-1]['ours_ms']:.2f} ms, "
              f"{case.baseline} {rows[-1]['baseline_ms']:.2f} ms", flush=True)
    end_to_end: dict[str, object] = {"note": "skipped (--tiny)"}
    data = None if args.tiny else cnn.load_mnist_test(args.data)
    if data is not None:
        seconds = cnn.epoch_seconds(*data, rounds=1 if args.quick else 3)
        end_to_end = {"ours_s": seconds["ours"], "torch_s": seconds["torch"]}
    elif not args.tiny:
        end_to_end = {"note": f"skipped: no MNIST files under {args.data}/mnist"}
    folding = fold.measure(quick=args.quick or args.tiny)
    sync: dict[str, object] = {"note": "skipped (--tiny or --no-syncbn)"}
    if not (args.tiny or args.no_syncbn):
        sync = syncbn.measure(quick=args.quick)
    report = {"machine": info, "copy_bandwidth_gbs": bandwidth / 1e9,
              "allocator": allocation_note(args.keep_freed_memory),
              "rounds": rounds, "load_before": round(load_before, 2),
              "load_after": round(os.getloadavg()[0], 2), "rows": rows,
              "summary": summarize(rows), "end_to_end": end_to_end,
              "fold": folding, "syncbn": sync,
              "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0
