"""Fixtures for the experiment tests: scikit-learn's bundled digits, small enough that
every experiment's tiny configuration trains in about a second."""

from __future__ import annotations

import pytest

from batchnorm.data import Split, load_split


@pytest.fixture(scope="session")
def digits() -> Split:
    return load_split("digits")
