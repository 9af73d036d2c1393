"""Outputs of the C++ kernels from 128 KiB up reuse the memory of freed ones
(csrc/output_cache.cpp): counted in page faults, since writing a freshly mapped page faults
and a reused one does not. The 64 MiB output is over glibc's largest mmap threshold (32 MiB),
so without the cache every call maps fresh pages; the 512 KiB one is, with glibc's threshold
held at its default of 128 KiB."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest
import torch
from fresh_process import call_in_new_process

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import extension

SHAPE = (16, 64, 128, 128)  # 64 MiB of float32
MEDIUM = (2, 64, 32, 32)  # 512 KiB


def _pages(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * 4 // 4096


PAGES = _pages(SHAPE)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    if not extension.available():
        pytest.skip("the C++ CPU kernels could not be built on this machine (see the warning)")
    with kernels.use_backend(None):
        yield


def _faults_of_second_call(shape: tuple[int, ...] = SHAPE
                           ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Minor page faults of an eval BatchNorm2d forward whose previous output was freed."""
    layer = batchnorm.BatchNorm2d(shape[1]).eval()
    x = torch.randn(shape)
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


def _run_with_limit(limit: str, shape: tuple[int, ...] = SHAPE, **env: str
                    ) -> subprocess.CompletedProcess:
    """:func:`_faults_of_second_call` in a process that reads this cache limit (and ``env``)."""
    return call_in_new_process(
        __file__, f"print(test['_faults_of_second_call']({shape!r})[0], "
                  f"test['_pages']({shape!r}))", BATCHNORM_OUTPUT_CACHE_MB=limit, **env)


def _faults_and_pages(run: subprocess.CompletedProcess) -> tuple[int, int]:
    assert run.returncode == 0, run.stderr
    faults, pages = map(int, run.stdout.split()[-2:])
    return faults, pages


def test_a_medium_output_reuses_memory_where_glibc_maps_fresh_pages():
    """glibc maps every block from its mmap threshold up afresh; it raises the threshold as
    such blocks are freed and trims its heap top, so whether a medium output faults depends
    on what ran before. Held at its default (128 KiB), the threshold makes that every call."""
    glibc_default = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    faults, pages = _faults_and_pages(_run_with_limit("1024", MEDIUM, **glibc_default))
    assert faults < pages // 4, f"{faults} page faults for an output of {pages} pages"
    faults, pages = _faults_and_pages(_run_with_limit("0", MEDIUM, **glibc_default))
    assert faults > pages // 2, f"without the cache: {faults} page faults for {pages} pages"


def test_a_limit_of_zero_turns_the_cache_off_and_a_bad_limit_is_named():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: fresh memory faults once per 2 MiB, "
                    "too few faults to tell fresh pages from reused ones")
    faults, pages = _faults_and_pages(_run_with_limit("0"))
    assert faults > pages // 2, f"{faults} page faults for an output of {pages} pages"
    bad = _run_with_limit("lots")
    assert bad.returncode != 0
    assert "BATCHNORM_OUTPUT_CACHE_MB must be a non-negative integer (MiB), got 'lots'" in \
        bad.stderr
