"""``batchnorm experiment`` and ``batchnorm demo`` as a user meets them: listing, outputs,
which data they train on, one-line errors, Ctrl-C, rerunning, --restart."""

from __future__ import annotations

import gzip
import json

import pytest

from batchnorm.cli import main as batchnorm_main
from batchnorm.data import Split
from batchnorm.experiments import cli
from batchnorm.experiments.registry import EXPERIMENTS

TINY = ["init-sweep", "--tiny", "--no-progress"]


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_list_prints_every_experiment_on_one_line_each(capsys):
    assert batchnorm_main(["experiment", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(EXPERIMENTS)
    assert [name for name in EXPERIMENTS] == ["init-sweep", "mnist-mlp", "update-ops",
                                              "placement", "batch-size", "norms", "recalibrate"]


def test_tiny_run_writes_its_outputs_into_out_with_the_seed(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main([*TINY, "--dataset", "digits", "--out", str(out), "--seed", "7"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 7 and results["data"]["name"] == "digits"
    assert (out / "summary.md").is_file() and (out / "init_sweep.png").is_file()
    assert str(out) in capsys.readouterr().out


def test_with_nothing_asked_for_it_falls_back_to_digits_and_says_how_to_get_mnist(
        empty_home, capsys):
    data = cli.load_data(None, None)
    assert isinstance(data, Split) and data.name == "digits"
    out = capsys.readouterr().out
    assert f"no MNIST under {empty_home / '.cache' / 'batchnorm' / 'mnist'}" in out
    assert "`batchnorm data fetch mnist` downloads it" in out


@pytest.mark.parametrize("request_", [["--dataset", "mnist"], ["--data-dir", "{missing}"],
                                      ["--dataset", "mnist", "--data-dir", "{missing}"]])
def test_a_named_dataset_or_folder_that_is_missing_is_an_error_not_a_fallback(
        request_, empty_home, tmp_path, capsys):
    arguments = [arg.format(missing=tmp_path / "nonexistent") for arg in request_]
    assert batchnorm_main(["demo", *arguments, "--out", str(tmp_path / "out")]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("batchnorm demo: error: mnist not found under ")
    assert "batchnorm data fetch mnist" in line
    assert not (tmp_path / "out" / "results.json").exists()


def test_batchnorm_data_set_to_a_folder_without_mnist_is_an_error(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("BATCHNORM_DATA", str(tmp_path / "empty"))
    assert batchnorm_main(["experiment", *TINY, "--out", str(tmp_path / "out")]) == 2
    [line] = error_lines(capsys)
    assert f"mnist not found under {tmp_path / 'empty' / 'mnist'}" in line


def test_a_corrupt_data_file_is_one_error_line_naming_it(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(b"not an idx file"))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"nor this"))
    assert batchnorm_main(["experiment", *TINY, "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "out")]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"batchnorm experiment: error: {images}: MD5 checksum mismatch")


def test_ctrl_c_keeps_the_checkpoint_says_so_exits_130_and_the_same_command_resumes(
        tmp_path, monkeypatch, capsys):
    command = [*TINY, "--dataset", "digits", "--out", str(tmp_path / "resumed")]
    assert cli.main([*TINY, "--dataset", "digits", "--out", str(tmp_path / "whole")]) == 0
    run_experiment = cli.run_experiment

    def interrupted(*args, **kwargs):
        def press_ctrl_c(name: str, records: int) -> None:
            if records == 2:
                raise KeyboardInterrupt

        return run_experiment(*args, **kwargs, on_record=press_ctrl_c)

    monkeypatch.setattr(cli, "run_experiment", interrupted)
    capsys.readouterr()
    assert cli.main(command) == 130
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    assert error_lines(capsys)[-1] == (f"init-sweep: interrupted; the checkpoint {checkpoint} "
                                       "is kept: run the same command again to resume")
    monkeypatch.setattr(cli, "run_experiment", run_experiment)
    assert cli.main(command) == 0
    assert "resuming run 'bn' after record 2" in capsys.readouterr().out
    assert ((tmp_path / "resumed" / "results.json").read_bytes()
            == (tmp_path / "whole" / "results.json").read_bytes())


def test_rerunning_a_finished_experiment_says_it_reused_the_results(tmp_path, capsys):
    command = [*TINY, "--dataset", "digits", "--out", str(tmp_path)]
    assert cli.main(command) == 0
    assert "reused" not in capsys.readouterr().out
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert (f"{tmp_path / 'checkpoint.pt'}: reused the results of 2 of 2 finished runs "
            "(nothing left to train)") in out


def test_a_corrupt_checkpoint_is_one_error_line_and_restart_starts_over(tmp_path, capsys):
    command = [*TINY, "--dataset", "digits", "--out", str(tmp_path)]
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert batchnorm_main(["experiment", *command]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"batchnorm experiment: error: {tmp_path / 'checkpoint.pt'}: "
                           "unreadable checkpoint")
    assert "start over with --restart" in line
    assert batchnorm_main(["experiment", *command, "--restart"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "init-sweep"


def test_unknown_experiment_is_rejected_with_the_choices(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["init-swep"])
    assert error.value.code == 2
    assert "invalid choice: 'init-swep'" in capsys.readouterr().err


def test_thread_count_below_one_is_rejected_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["norms", "--threads", "0"])
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
