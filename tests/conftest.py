"""Shared test configuration: where the real MNIST files live.

Tests marked ``mnist`` read ``$BATCHNORM_DATA/mnist`` (default ``../shared/data`` beside the
repository). Without it they skip with a loud reason, except under CI
(``BATCHNORM_REQUIRE_DATA=1``), where a missing data set is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("BATCHNORM_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "mnist").is_dir():
        reason = f"MNIST not found under {root / 'mnist'}: set BATCHNORM_DATA"
        if os.environ.get("BATCHNORM_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    return root
