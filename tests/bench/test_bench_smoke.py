"""`batchnorm bench --quick --tiny` runs end to end and writes a consistent report
(no timing assertions: speed is the benchmark's business, not the tests'). The runs use
one torch thread: on a machine busier than its cores, every multi-threaded parallel
region waits for a descheduled thread, which only makes the smoke test slow."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from batchnorm import bench
from batchnorm.bench import measure, training
from batchnorm.bench.cases import TINY
from batchnorm.cli import main as cli_main


def _run(tmp_path, *args: str) -> dict:
    with measure.num_threads(1):
        assert bench.main(["--quick", "--tiny", "--out", str(tmp_path), *args]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def _assert_ratio(comparison: dict, baseline_ms: float, ours_ms: float) -> None:
    assert comparison["ratio"] == pytest.approx(baseline_ms / ours_ms)
    assert comparison["low"] <= comparison["high"] and comparison["spread"] >= 0
    assert comparison["steady"] is (not comparison["unsteady_because"])


def _cell(comparison: dict) -> str:
    """How the markdown must show a ratio: as a number only when its rounds were steady."""
    ratio = f"{comparison['ratio']:.2f}x"
    return f"| {ratio} |" if comparison["steady"] else f"| ({ratio}) ⚠ |"


def test_quick_tiny_run_writes_json_and_markdown_for_every_case_and_model(tmp_path, capsys):
    report = _run(tmp_path, "--no-compile")
    assert [row["case"] for row in report["layers"]] == [case.name for case in TINY]
    for row in report["layers"]:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["roofline_ms"] > 0
        train_passes = 7 if "+add" in row["case"] else 5
        assert row["roofline_passes"] == (train_passes if row["mode"] == "train" else 2)
        _assert_ratio(row["speedup"], row["baseline_ms"], row["ours_ms"])
        assert row["compile_ms"] is None and row["vs_compile"] is None
        assert {len(times) for times in row["rounds_ms"].values()} == {3}
        # the roofline comes from the copy timed in the same rounds, not a global bandwidth
        copy_ms = row["roofline_ms"] / row["roofline_passes"] * 2
        assert copy_ms == pytest.approx(statistics.median(row["rounds_ms"]["copy"]))
        assert row["ours_over_roofline"]["ratio"] == pytest.approx(
            row["ours_ms"] / row["roofline_ms"])
        plain_bn = row["group"].startswith("BN training")
        assert row["bound_passes"] == (8 if plain_bn else None)
        if plain_bn:
            assert row["ours_over_bound"]["ratio"] == pytest.approx(
                row["ours_over_roofline"]["ratio"] * row["roofline_passes"] / 8)
        else:
            assert row["ours_over_bound"] is None
    fixed_cost = next(row for row in report["layers"] if "fixed cost" in row["case"])
    assert fixed_cost["threads"] == 1 and fixed_cost["shape"] == [8, 16]
    assert {group["group"] for group in report["layers_summary"]} == \
        {case.group for case in TINY}
    expected = [(case.name, layout, mode) for case in training.TINY_MODELS
                for layout in case.layouts for mode in ("eager", "eager, fused activations")]
    assert [(row["model"], row["layout"], row["mode"]) for row in report["models"]] == expected
    for row in report["models"]:
        _assert_ratio(row["speedup"], row["torch_ms"], row["ours_ms"])
    fused = {row["model"]: row["note"] for row in report["models"]
             if row["mode"] == "eager, fused activations" and row["layout"] == "contiguous"}
    assert fused["TF tutorial MLP (7 layers, leaky ReLU)"] == "6 activation(s) fused"
    assert fused["Hands-On ML MLP (300-100, ELU)"] == "0 activation(s) fused"  # BN after ELU
    assert {(group["mode"], group["layout"]) for group in report["models_summary"]} == \
        {(mode, layout) for mode in ("eager", "eager, fused activations")
         for layout in ("contiguous", "channels_last")}
    info = report["machine"]
    assert info["torch_threads"] >= 1 and info["cores"] >= 1 and info["torch"]
    assert set(info["load_average"]) == {"before", "after"}
    assert report["copy_bandwidth_gbs"] > 0
    assert report["fold"]["folded_ms"] > 0 and report["fold"]["max_abs_diff"] < 1e-4
    assert report["mnist_epoch"] == report["syncbn"] == {"note": "skipped (--tiny)"}
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("\n| ") == (len(TINY) + 1) + (len(expected) + 1) + \
        (len(report["models_summary"]) + 1)
    for row in report["layers"] + report["models"]:
        assert _cell(row["speedup"]) in markdown
    assert markdown in capsys.readouterr().out


def test_a_compiled_row_is_compiled_before_its_rounds_are_timed(tmp_path):
    report = _run(tmp_path, "--sections", "layers", "--filter", "BN1d 16x8",
                  "--compile-backend", "eager")
    [row] = report["layers"]
    assert row["compile_note"].startswith("compiled in ")
    assert row["compile_ms"] > 0 and row["graphs_compiled_while_timing"] == 0
    _assert_ratio(row["vs_compile"], row["compile_ms"], row["ours_ms"])
    assert report["settings"]["compile_backend"] == "eager"


def test_a_model_group_compiles_every_variant_before_timing_them_all():
    """torch.nn and converted (also with fused activations), eager and compiled, and
    converted compiled with our layers kept as operators (not decomposed): all compiled
    before the first timed round."""
    no_norm = training.ModelCase("linear", lambda: torch.nn.Linear(6, 3), (4, 6), 3)
    compiler = measure.Compiler(budget_s=120, backend="eager")
    rows = training.run(no_norm, "contiguous", compiler, rounds=3, warmup=0,
                        min_round_s=0, limits=measure.Limits())
    assert [row["mode"] for row in rows] == ["eager", "eager, fused activations", "compile",
                                             "compile, operators"]
    for row in rows:
        assert row["graphs_compiled_while_timing"] == 0
        assert set(row["rounds_ms"]) == {"torch", "ours"}
        _assert_ratio(row["speedup"], row["torch_ms"], row["ours_ms"])
    assert rows[1]["note"] == "0 activation(s) fused"
    assert rows[2]["note"].count("compiled in") == 2


def test_sections_select_what_runs_and_the_rest_is_marked_skipped(tmp_path):
    report = _run(tmp_path, "--no-compile", "--sections", "layers", "--filter", "LayerNorm")
    assert [row["case"] for row in report["layers"]] == ["LayerNorm",
                                                         "LayerNorm eval forward"]
    assert report["models"] == [] and report["models_summary"] == []
    assert report["fold"] == {"note": "skipped (--sections)"}
    assert set(report["section_wall_s"]) == {"layers"}


def test_filter_selects_cases_and_models_through_the_cli(tmp_path):
    with measure.num_threads(1):
        assert cli_main(["bench", "--quick", "--tiny", "--no-compile", "--sections",
                         "layers,models", "--filter", "MLP", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["layers"] == []
    assert {row["model"] for row in report["models"]} == \
        {case.name for case in training.TINY_MODELS if "MLP" in case.name}


def test_filter_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="matches no case or model"):
        bench.main(["--tiny", "--filter", "no such case", "--out", str(tmp_path)])


@pytest.mark.parametrize(("args", "message"), [
    (["--sections", "layers,nonsense"], "--sections expects a comma-separated subset"),
    (["--rounds", "2"], "--rounds must be at least 3"),
    (["--margin", "0"], "--margin must be positive"),
])
def test_bad_options_are_refused_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(args)
    assert message in capsys.readouterr().err


def test_only_the_load_before_the_run_is_read_as_other_work(tmp_path):
    """The load average after the run counts the bench's own threads."""
    report = _run(tmp_path, "--no-compile", "--sections", "layers", "--filter", "LayerNorm")
    for before, after, flagged in [(0.3, 2.6, False), (2.5, 1.0, True), (1.9, 1.9, False)]:
        report["machine"].update(cores=2, load_average={"before": before, "after": after})
        header = bench.report.markdown(report).splitlines()[0]
        assert f"before / after: {before} / {after}" in header
        assert ("other work was running" in header) is flagged
