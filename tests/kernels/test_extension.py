"""Building the C++ CPU kernels: flags by CPU capability, the cache location, and one warning
when the build fails."""

from __future__ import annotations

import pytest
import torch

from batchnorm.kernels import extension


@pytest.mark.parametrize(("capability", "avx2"), [("DEFAULT", False), ("AVX2", True),
                                                  ("AVX512", True)])
def test_the_avx2_vector_path_is_compiled_only_where_the_cpu_has_it(monkeypatch, capability,
                                                                     avx2):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags = extension.compile_flags()
    assert ("-DCPU_CAPABILITY_AVX2" in flags) == avx2
    assert ("-mavx2" in flags) == avx2 and ("-mfma" in flags) == avx2
    assert ("-DCPU_CAPABILITY=AVX2" if avx2 else "-DCPU_CAPABILITY=DEFAULT") in flags


def test_the_cache_is_keyed_by_torch_version_and_capability_under_the_env_directory(
        monkeypatch, tmp_path):
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    default = extension.build_directory()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    avx2 = extension.build_directory()
    assert default.parent == avx2.parent == tmp_path
    assert default != avx2
    assert torch.__version__.replace("+", "_") in default.name


def test_a_failed_build_warns_once_and_leaves_the_kernels_unavailable(monkeypatch):
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_failed", False)
    attempts = []

    def failing_build():
        attempts.append(1)
        raise OSError("line one\nx.cpp:3:1: error: no compiler here\nmore log")

    monkeypatch.setattr(extension, "_build", failing_build)
    with pytest.warns(RuntimeWarning, match="x.cpp:3:1: error: no compiler here") as record:
        assert not extension.available()
        assert not extension.available()
    assert len(record) == 1
    assert attempts == [1]
    with pytest.raises(RuntimeError, match="unavailable"):
        extension.load()
