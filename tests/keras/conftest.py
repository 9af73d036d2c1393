"""Golden vectors recorded from real tf_keras 2.21 by tools/make_tf_golden.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).with_name("golden.npz")


def _assert_close_to_tf(got: object, ref: np.ndarray, what: str) -> None:
    """rtol 1e-5; TF computes in float32 (and normalizes as ``x * inv + (beta - mean *
    inv)``, which cancels), so entries near zero get atol = 1e-5 * max|ref| of the array."""
    got = np.asarray(got.detach() if hasattr(got, "detach") else got,
                     dtype=np.float64).reshape(ref.shape)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref.astype(np.float64), rtol=1e-5, atol=1e-5 * scale,
                               err_msg=what)


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture
def close_to_tf() -> Callable[[object, np.ndarray, str], None]:
    return _assert_close_to_tf
