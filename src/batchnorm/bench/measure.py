"""Timing: interleaved rounds (each round times every competitor once, so a load change
hits all of them alike), medians, the machine's copy bandwidth, and bounded torch.compile."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from batchnorm.bench.cases import Case

Step = Callable[[], object]


def keep_freed_memory() -> None:
    """Make glibc serve allocations below 1 GiB from the heap and never return freed memory
    to the system, so a large output reuses pages already mapped instead of page-faulting
    fresh ones on every call. Process-wide: a benchmark switch that shows the page-fault
    share of a case, not something the library does to its users."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt refused the thresholds: --keep-freed-memory needs glibc")


def copy_bandwidth(megabytes: int = 256, repeats: int = 9) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on preallocated float32 buffers
    far larger than the caches."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def step(case: Case, op: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Step:
    """One call of ``op`` as the case runs it: forward (+ backward with a fixed dy)."""
    if case.mode == "eval":
        def forward() -> object:
            with torch.no_grad():
                return op(*inputs)
        return forward
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
    grad = torch.randn(inputs[0].shape).contiguous(memory_format=_format(inputs[0]))

    def train() -> object:
        for leaf in leaves:
            leaf.grad = None
        op(*leaves, *inputs[3:]).backward(grad)
        return leaves[0].grad
    return train


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def interleaved_medians(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per competitor over ``rounds`` interleaved rounds."""
    for _ in range(warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after ``seconds`` (SIGALRM)."""
    def expire(signum, frame):
        raise CompileTimeout(f"compile took longer than {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled_step(case: Case, inputs: list[torch.Tensor], budget_s: float
                  ) -> tuple[Step | None, str]:
    """A step of ``torch.compile(case.theirs)`` compiled within ``budget_s``, or None and
    the reason it is not available."""
    if budget_s <= 0:
        return None, "n/a (compile time budget spent)"
    compiled = torch.compile(case.compiled or case.theirs)
    run = step(case, compiled, inputs)
    start = time.perf_counter()
    try:
        with time_limit(budget_s):
            run()
    except Exception as error:  # any compile failure is a result to report
        torch._dynamo.reset()
        return None, f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    return run, f"compiled in {time.perf_counter() - start:.1f} s"
