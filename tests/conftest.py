"""Shared fixtures: where the real MNIST files live.

Tests that read MNIST take the ``mnist_data_dir`` fixture: ``$BATCHNORM_DATA`` (default
``../shared/data`` beside the repository) must hold ``mnist/`` with the official test
files. Without them the tests skip with a loud reason, except under CI
(``BATCHNORM_REQUIRE_DATA=1``), where a missing data set is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchnorm.data import default_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mnist_data_dir() -> Path:
    """Directory holding ``mnist/`` with at least the official MNIST test files (.gz)."""
    data_dir = default_data_dir(default=REPO_ROOT.parent / "shared" / "data")
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [name for name in names if not (data_dir / "mnist" / name).is_file()]
    if missing:
        reason = (f"REAL MNIST DATA MISSING: {', '.join(missing)} not under {data_dir / 'mnist'}"
                  " (set BATCHNORM_DATA to the folder holding mnist/)")
        if os.environ.get("BATCHNORM_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return data_dir


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """A user who configured nothing: no $BATCHNORM_DATA and an empty home, so the
    default data folder is ``<home>/.cache/batchnorm``; torch's caches (compiled
    extensions) stay where they were. Returns the home."""
    monkeypatch.delenv("BATCHNORM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME",
                                                        str(Path.home() / ".cache")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"
