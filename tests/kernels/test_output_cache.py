"""Large outputs of the C++ kernels reuse the memory of freed ones (csrc/output_cache.cpp):
counted in page faults, since writing a freshly mapped page faults and a reused one does not.
The 64 MiB output is over glibc's largest mmap threshold (32 MiB), so without the cache every
call maps fresh pages."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import extension

SHAPE = (16, 64, 128, 128)  # 64 MiB of float32
PAGES = torch.Size(SHAPE).numel() * 4 // 4096


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    if not extension.available():
        pytest.skip("the C++ CPU kernels could not be built on this machine (see the warning)")
    with kernels.use_backend(None):
        yield


def _faults_of_second_call() -> tuple[int, torch.Tensor, torch.Tensor]:
    """Minor page faults of an eval BatchNorm2d forward whose previous output was freed."""
    layer = batchnorm.BatchNorm2d(SHAPE[1]).eval()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        layer(x)  # the first output, freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = layer(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults, y, x


def test_a_large_output_reuses_the_memory_of_a_freed_one():
    faults, y, x = _faults_of_second_call()
    assert faults < PAGES // 100, f"{faults} page faults for an output of {PAGES} pages"
    reference = torch.nn.BatchNorm2d(SHAPE[1]).eval()
    torch.testing.assert_close(y, reference(x), rtol=1e-6, atol=1e-6)


def test_outputs_in_reused_memory_are_ordinary_resizable_tensors():
    _, y, _ = _faults_of_second_call()
    assert y.untyped_storage().resizable()
    head = y.flatten()[:10].clone()
    y.resize_(y.numel() + 1024)
    assert torch.equal(y[:10], head)
    assert y.numpy()[:10].tolist() == head.tolist()


def test_the_memory_profile_counts_outputs_in_reused_memory():
    layer = batchnorm.BatchNorm2d(SHAPE[1]).eval()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        layer(x)
        with torch.profiler.profile(profile_memory=True) as profile:
            layer(x)
    usage = {event.key: event.cpu_memory_usage for event in profile.key_averages()}
    assert usage["batchnorm::batch_norm"] >= x.numel() * x.element_size()


def _run_with_limit(limit: str) -> subprocess.CompletedProcess:
    """:func:`_faults_of_second_call` in a process that reads this cache limit."""
    code = (f"import runpy; test = runpy.run_path({str(Path(__file__))!r}); "
            "print(test['_faults_of_second_call']()[0], test['PAGES'])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "BATCHNORM_OUTPUT_CACHE_MB": limit}, timeout=300)


def test_a_limit_of_zero_turns_the_cache_off_and_a_bad_limit_is_named():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: fresh memory faults once per 2 MiB, "
                    "too few faults to tell fresh pages from reused ones")
    off = _run_with_limit("0")
    assert off.returncode == 0, off.stderr
    faults, pages = map(int, off.stdout.split()[-2:])
    assert faults > pages // 2, f"{faults} page faults for an output of {pages} pages"
    bad = _run_with_limit("lots")
    assert bad.returncode != 0
    assert "BATCHNORM_OUTPUT_CACHE_MB must be a non-negative integer (MiB), got 'lots'" in \
        bad.stderr
