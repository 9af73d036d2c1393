"""Fixtures for the experiment tests: scikit-learn's bundled digits, small enough that
every experiment's tiny configuration trains in about a second."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from batchnorm.data import Split, load_split


@pytest.fixture(scope="session")
def digits() -> Split:
    return load_split("digits")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread, as the CLI uses, avoids contention between cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
