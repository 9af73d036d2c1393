"""``batchnorm``'s dispatcher: a subcommand whose optional dependencies are missing says
which extra to install instead of ending in a traceback."""

from __future__ import annotations

import importlib

import pytest

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
