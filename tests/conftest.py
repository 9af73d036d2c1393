"""Shared fixtures: where the real MNIST files live; Triton's interpreter without a GPU.

Tests that read MNIST take the ``mnist_data_dir`` fixture: ``$BATCHNORM_DATA`` (default
``../shared/data`` beside the repository) must hold ``mnist/`` with the official test
files. Without them the tests skip with a loud reason, except under CI
(``BATCHNORM_REQUIRE_DATA=1``), where a missing data set is a failure.

Without CUDA, ``TRITON_INTERPRET=1`` is set here, before any test imports the Triton
kernels (triton reads it when a kernel is defined), so that they run on CPU tensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch._functorch.config

if not torch.cuda.is_available():  # before batchnorm (and so triton) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batchnorm.data import default_data_dir

# Custom operators whose outputs alias inputs or each other fail compiled graphs wherever
# ``CI`` is set (torch's own switch); the suite fails on them everywhere.
torch._functorch.config.error_on_custom_op_aliasing = True

REPO_ROOT = Path(__file__).resolve().parents[1]
# Test helpers shared by several folders (``lookalikes``) import by module name, which
# pytest's importlib mode does not provide.
sys.path.insert(0, str(Path(__file__).parent))


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
    default data folder is ``<home>/.cache/batchnorm``; torch's caches and our compiled
    kernels stay where they were (no rebuild in the empty home). Returns the home."""
    from batchnorm.kernels import extension

    monkeypatch.delenv("BATCHNORM_DATA", raising=False)
    monkeypatch.setenv(extension.CACHE_ENV, str(extension.build_directory().parent))
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME",
                                                        str(Path.home() / ".cache")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"
