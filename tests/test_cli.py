"""``batchnorm``'s dispatcher: help, version, ``python -m batchnorm``, one-line errors, and
a subcommand whose optional dependencies are missing says which extra to install."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import batchnorm
from batchnorm import cli


def test_missing_experiments_extra_names_the_module_and_the_install_command(monkeypatch,
                                                                            capsys):
    def missing(name: str):
        raise ModuleNotFoundError(f"No module named 'tqdm' (importing {name})", name="tqdm")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "batchnorm demo needs the 'experiments' extra (missing module 'tqdm')" in error
    assert "pip install 'batchnorm[experiments]'" in error


def test_other_missing_modules_are_not_hidden(monkeypatch):
    def missing(name: str):
        raise ModuleNotFoundError("No module named 'no_such_module'", name="no_such_module")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.main(["demo"])


def test_bare_command_lists_the_subcommands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: batchnorm [--version] [--debug] COMMAND [ARGS...]")
    for name, (_, text) in cli.COMMANDS.items():
        assert f"  {name}" in out and text in out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert cli.main(["doctor", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"batchnorm doctor: error: MODEL '{missing}': no such file, and not a "
        "'package.module:function' spec (--debug shows the traceback)"]
    for argv in (["--debug", "doctor", str(missing)], ["doctor", str(missing), "--debug"]):
        with pytest.raises(FileNotFoundError):
            cli.main(argv)


def test_python_dash_m_batchnorm_is_the_batchnorm_command():
    environment = {**os.environ, "PYTHONPATH": str(Path(batchnorm.__file__).parents[1])}
    version = subprocess.run([sys.executable, "-m", "batchnorm", "--version"],
                             capture_output=True, text=True, env=environment, timeout=120)
    assert (version.returncode, version.stdout.strip()) == (0, f"batchnorm {batchnorm.__version__}")
    error = subprocess.run([sys.executable, "-m", "batchnorm", "fold", "nothing.pt", "out.pt"],
                           capture_output=True, text=True, env=environment, timeout=120)
    assert error.returncode == 2
    assert error.stderr.strip().splitlines() == [
        "batchnorm fold: error: MODEL 'nothing.pt': no such file, and not a "
        "'package.module:function' spec (--debug shows the traceback)"]
