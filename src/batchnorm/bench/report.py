"""The bench's summaries and its markdown: machine, settings, one table per section,
geometric means, and a mark on every ratio whose rounds disagree."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

UNSTEADY = "⚠"


def geometric_mean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: Iterable[dict], key: Callable[[dict], tuple[str, ...]],
              names: tuple[str, ...]) -> list[dict[str, object]]:
    """Per value of ``key(row)`` (in first-seen order): the geometric mean, lowest and count
    of the rows' speedup ratios, and how many of them are unsteady."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        if row["speedup"] is not None:
            groups.setdefault(key(row), []).append(row["speedup"])
    return [{**dict(zip(names, group, strict=True)),
             "geomean": geometric_mean([s["ratio"] for s in speedups]),
             "lowest": min(s["ratio"] for s in speedups), "rows": len(speedups),
             "unsteady": sum(not s["steady"] for s in speedups)}
            for group, speedups in groups.items()]


def ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _ratio(comparison: dict | None) -> str:
    """A steady ratio as a number; an unsteady one in parentheses, marked."""
    if comparison is None:
        return "n/a"
    text = f"{comparison['ratio']:.2f}x"
    return text if comparison["steady"] else f"({text}) {UNSTEADY}"


def _spread(comparison: dict | None) -> str:
    return "n/a" if comparison is None else f"{comparison['spread']:.0%}"


def _wait(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _header(report: dict) -> list[str]:
    info, settings = report["machine"], report["settings"]
    load = info["load_average"]
    # Only the load before the run tells of other work: the one after counts the bench's own
    # threads of the last minute (the per-row CPU wait is what detects contention).
    busy = (" (above the core count before the run: other work was running)"
            if load["before"] > info["cores"] else "")
    compiled = (f"torch.compile (backend {settings['compile_backend']}) compiles in-process "
                f"and is warmed up before timing, within {settings['compile_budget_s']:.0f} "
                "s per section" if settings["compile_backend"] else "torch.compile off")
    return [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}; load average (1 min) "
        f"before / after: {load['before']} / {load['after']}{busy}. Wall time "
        f"{report['wall_s']:.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s"
                    for name, seconds in report["section_wall_s"].items()) + ").",
        f"Timing: {settings['warmup']} warm-up round(s), then interleaved rounds "
        f"({settings['rounds']['layers']} for single layers, {settings['rounds']['models']} "
        f"for models) in which each competitor runs back to back for at least "
        f"{settings['min_round_ms']['layers']:g} / {settings['min_round_ms']['models']:g} ms; "
        f"times are medians. {compiled}. Copy bandwidth (read + write) at the start: "
        f"{report['copy_bandwidth_gbs']:.1f} GB/s{_bandwidth_range(report['layers'])}; "
        f"{settings['allocator']}.",
        f"Ratios: baseline time / ours (>1: ours faster), the quotient of the medians. "
        f"Spread: interquartile range of the per-round ratios over their median. CPU wait: "
        f"share of the time the bench's threads were runnable that they waited for a core. "
        f"{UNSTEADY}: spread above {settings['margin']:.0%}, CPU wait above "
        f"{settings['max_cpu_wait']:.0%}, or torch.compile compiled during the timed "
        f"rounds; such a ratio (in parentheses) is not a measurement.", ""]


def _bandwidth_range(layers: list[dict]) -> str:
    rates = [row["copy_bandwidth_gbs"] for row in layers if row["shape_bytes"] >= 2**25]
    return f", {min(rates):.1f}-{max(rates):.1f} GB/s during the single layers of 32 MiB " \
        "or more" if rates else ""


def _layers(report: dict) -> list[str]:
    lines = ["Single layers (float32; training = forward + backward with a fixed output "
             "gradient; roofline = least traffic over the bandwidth of a copy of the input's "
             "size timed in the same rounds: 5 tensor passes for training (read x, write y; "
             "read dy and x, write dx; 7 with a shortcut), 2 for an eval forward; BN bound = "
             "the 8 passes plain BatchNorm training needs, since its statistics need all of x "
             "before any y and dx needs the reductions over all of dy (read x; read x, write "
             "y; read dy and x; read dy and x, write dx); parameters not counted; both mean "
             "little for a case that fits in cache):", "",
             "| case | shape | mode | ours ms | baseline | baseline ms | speedup | spread | "
             "torch.compile ms | vs compile | ours / roofline | ours / BN bound | load | "
             "CPU wait |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["layers"]:
        compiled = ms(row["compile_ms"]) if row["compile_ms"] is not None else \
            row["compile_note"]
        lines.append(
            f"| {row['case']} | {_shape(row['shape'])} | {row['mode']} | "
            f"{ms(row['ours_ms'])} | {row['baseline']} | {ms(row['baseline_ms'])} | "
            f"{_ratio(row['speedup'])} | {_spread(row['speedup'])} | {compiled} | "
            f"{_ratio(row['vs_compile'])} | {_ratio(row['ours_over_roofline'])} | "
            f"{_ratio(row['ours_over_bound'])} | {row['load_1min']} | "
            f"{_wait(row['cpu_wait'])} |")
    lines.append("")
    for group in report["layers_summary"]:
        lines.append(f"- {group['group']}: geometric-mean speedup {group['geomean']:.2f}x "
                     f"({group['rows']} rows, lowest {group['lowest']:.2f}x, "
                     f"{group['unsteady']} unsteady).")
    return [*lines, ""]


def models_markdown(models: list[dict], summary: list[dict]) -> list[str]:
    """The models table (rows of :func:`batchnorm.bench.training.run`) and its summary."""
    lines = ["End-to-end training steps (forward, cross-entropy, backward, SGD momentum "
             "step; torch.nn model vs batchnorm.convert of a copy):", "",
             "| model | input | layout | mode | torch.nn ms | converted ms | speedup | "
             "spread | load | CPU wait | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in models:
        lines.append(
            f"| {row['model']} | {_shape(row['input_shape'])} | {row['layout']} | "
            f"{row['mode']} | {ms(row['torch_ms'])} | {ms(row['ours_ms'])} | "
            f"{_ratio(row['speedup'])} | {_spread(row['speedup'])} | {row['load_1min']} | "
            f"{_wait(row['cpu_wait'])} | {row['note']} |")
    lines += ["", "| mode | layout | geometric-mean speedup | rows | lowest | unsteady |",
              "|---|---|---:|---:|---:|---:|"]
    for group in summary:
        lines.append(f"| {group['mode']} | {group['layout']} | {group['geomean']:.2f}x | "
                     f"{group['rows']} | {group['lowest']:.2f}x | {group['unsteady']} |")
    return [*lines, ""]


def _flag(comparison: dict) -> str:
    return "" if comparison["steady"] else \
        f" {UNSTEADY} unsteady: {', '.join(comparison['unsteady_because'])}"


def _others(report: dict) -> list[str]:
    lines = []
    epoch = report["mnist_epoch"]
    if "ours_s" in epoch:
        lines.append(f"- One epoch of a two conv+BN+ReLU block CNN on the 10,000 MNIST test "
                     f"images (batch {epoch['batch_size']}): ours {epoch['ours_s']:.2f} s, "
                     f"torch.nn {epoch['torch_s']:.2f} s "
                     f"({epoch['speedup']['ratio']:.2f}x{_flag(epoch['speedup'])}).")
    else:
        lines.append(f"- MNIST epoch: {epoch['note']}")
    folding = report["fold"]
    if "folded_ms" in folding:
        lines.append(
            f"- batchnorm.fold, eval forward of a {folding['model']} on "
            f"{_shape(folding['input_shape'])}: torch.nn BN {ms(folding['torch_bn_ms'])} ms, "
            f"ours {ms(folding['ours_bn_ms'])} ms, folded {ms(folding['folded_ms'])} ms "
            f"({folding['speedup_vs_torch_bn']:.2f}x vs torch.nn BN"
            f"{_flag(folding['vs_torch_bn_rounds'])}; max abs difference "
            f"{folding['max_abs_diff']:.1e}).")
    else:
        lines.append(f"- fold: {folding['note']}")
    sync = report["syncbn"]
    if "ratio" in sync:
        lines.append(
            f"- SyncBatchNorm on {sync['processes']} processes (gloo, "
            f"{_shape(sync['shape'])} per process, train step): {ms(sync['syncbn_ms'])} ms "
            f"vs local BatchNorm2d {ms(sync['local_ms'])} ms (cost "
            f"{sync['ratio']['ratio']:.2f}x{_flag(sync['ratio'])}); collectives per step: "
            f"{sync['collectives_forward']} forward, {sync['collectives_backward']} backward.")
    else:
        lines.append(f"- SyncBatchNorm: {sync['note']}")
    return lines


def markdown(report: dict) -> str:
    lines = _header(report)
    if report["layers"]:
        lines += _layers(report)
    if report["models"]:
        lines += models_markdown(report["models"], report["models_summary"])
    return "\n".join(lines + _others(report)) + "\n"
