"""kernels.primitives: the one dispatch point, its backend switch and its fallbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from batchnorm import kernels
from batchnorm.kernels import reference


def test_forced_torch_backend_uses_the_reference_everywhere():
    with kernels.use_backend("torch"):
        assert kernels.primitives(torch.randn(64, 32, 16, 16)) is reference
    assert kernels.forced_backend() is None


@pytest.mark.parametrize("name", [" CPP ", "cpp"])
def test_backend_names_are_normalized(name):
    with kernels.use_backend(name):
        assert kernels.forced_backend() == "cpp"


def test_non_float_tensors_get_the_reference_whatever_is_forced():
    for backend in ("cpp", "triton", None):
        with kernels.use_backend(backend):
            assert kernels.primitives(torch.zeros(3, dtype=torch.int64)) is reference


def test_unknown_backend_is_rejected_with_the_variable_name():
    with (pytest.raises(ValueError, match=r"BATCHNORM_BACKEND must be one of .*'cuda'"),
          kernels.use_backend("cuda")):
        pass


def test_the_environment_variable_is_read_once_at_import():
    code = ("import os, torch; from batchnorm import kernels; "
            "os.environ['BATCHNORM_BACKEND'] = 'cpp'; print(kernels.forced_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"BATCHNORM_BACKEND": "torch", "PATH": "",
                                 "PYTHONPATH": ":".join(sys.path)}, check=True)
    assert result.stdout.strip() == "torch"


def test_aten_sends_the_plain_layers_to_torch_kernels_and_keeps_the_primitives():
    """torch's kernels for the plain layers only where asked for; the variants keep the
    device's primitives (the C++ ones here, as without forcing)."""
    x = torch.randn(4, 3)
    assert not kernels.native()
    default = kernels.primitives(x)
    with kernels.use_backend("aten"):
        assert kernels.native()
        assert kernels.primitives(x) is default
    with kernels.use_backend("torch"):
        assert not kernels.native()
