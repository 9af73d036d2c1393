"""`batchnorm bench --quick --tiny` runs end to end and writes a consistent report
(no timing assertions: speed is the benchmark's business, not the tests')."""

from __future__ import annotations

import json

import pytest

from batchnorm import bench
from batchnorm.bench.cases import TINY
from batchnorm.cli import main as cli_main


def test_quick_tiny_run_writes_json_and_markdown_for_every_case(tmp_path, capsys):
    assert bench.main(["--quick", "--tiny", "--no-compile", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert [row["case"] for row in report["rows"]] == [case.name for case in TINY]
    for row in report["rows"]:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["roofline_ms"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ours_ms"])
    assert report["machine"]["torch_threads"] >= 1 and report["copy_bandwidth_gbs"] > 0
    assert report["fold"]["folded_ms"] > 0 and report["fold"]["max_abs_diff"] < 1e-4
    assert "note" in report["syncbn"]  # --tiny leaves out the two-process row
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("\n| ") == len(TINY) + 1  # header + one row per case
    assert markdown in capsys.readouterr().out


def test_filter_selects_cases_through_the_cli(tmp_path):
    assert cli_main(["bench", "--quick", "--tiny", "--no-compile", "--filter", "LayerNorm",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["case"] for row in rows] == ["LayerNorm"]


def test_filter_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="matches no case"):
        bench.main(["--tiny", "--filter", "no such case", "--out", str(tmp_path)])
