"""``batchnorm experiment``: listing, running into --out, argument errors."""

from __future__ import annotations

import json

import pytest

from batchnorm.cli import main as batchnorm_main
from batchnorm.data import Split
from batchnorm.experiments import cli
from batchnorm.experiments.registry import EXPERIMENTS


def test_list_prints_every_experiment_on_one_line_each(capsys):
    assert batchnorm_main(["experiment", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(EXPERIMENTS)
    assert [name for name in EXPERIMENTS] == ["init-sweep", "mnist-mlp", "update-ops",
                                              "placement", "batch-size", "norms", "recalibrate"]


def test_tiny_run_writes_its_outputs_into_out_with_the_seed(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["init-sweep", "--tiny", "--dataset", "digits", "--out", str(out),
                     "--seed", "7", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 7 and results["data"]["name"] == "digits"
    assert (out / "summary.md").is_file() and (out / "init_sweep.png").is_file()
    assert str(out) in capsys.readouterr().out


def test_missing_dataset_falls_back_to_digits_and_says_why(tmp_path, capsys):
    data = cli.load_data("mnist", tmp_path)
    assert isinstance(data, Split) and data.name == "digits"
    assert "mnist not found" in capsys.readouterr().out


def test_unknown_experiment_is_rejected_with_the_choices(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["init-swep"])
    assert error.value.code == 2
    assert "invalid choice: 'init-swep'" in capsys.readouterr().err


def test_thread_count_below_one_is_rejected_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["norms", "--threads", "0"])
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
