"""Timing: interleaved rounds, their spread, the machine's copy bandwidth, and
torch.compile finished before anything is timed.

A round runs every competitor in turn, each for enough back-to-back calls to last a
minimum time, so a load change hits all competitors of the round alike and the
timer's resolution does not decide microsecond-long calls. A ratio is the quotient of
the competitors' median times. It is reported as a measurement only if the per-round
ratios agree (interquartile range over median within ``Limits.margin``), the timed
threads seldom waited for a CPU, and nothing was compiled during the timed rounds;
otherwise the row is flagged unsteady, with the reasons.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

Step = Callable[[], object]
DEFAULT_MARGIN = 0.15
DEFAULT_MAX_CPU_WAIT = 0.10


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


def load_average() -> float:
    """The 1-minute load average, rounded for the report."""
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: unchanged), then restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _calls_per_round(run: Step, min_round_s: float, seconds: float | None) -> int:
    """Calls that fill ``min_round_s``, from one call's ``seconds`` (None: time a call)."""
    if min_round_s <= 0:
        return 1
    if seconds is None:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return max(1, math.ceil(min_round_s / max(seconds, 1e-7)))


def _schedstat() -> tuple[int, int] | None:
    """Nanoseconds this process's threads have spent on a CPU and runnable but waiting for
    one (Linux schedstat), None where the kernel does not report them."""
    running = waiting = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stat:
                fields = stat.read().split()
            running, waiting = running + int(fields[0]), waiting + int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return running, waiting


class CpuWaitMeter:
    """From its creation to :meth:`share`: the share of the time this process's threads
    were runnable that they spent waiting for a core. Near 0 on a machine with cores to
    spare; high when other work holds them, which slows every round alike."""

    def __init__(self) -> None:
        self._start = _schedstat()

    def share(self) -> float | None:
        end = _schedstat()
        if self._start is None or end is None:
            return None
        running, waiting = (after - before for after, before in zip(end, self._start,
                                                                    strict=True))
        return min(1.0, max(0.0, waiting / (running + waiting))) if running + waiting > 0 \
            else 0.0


@dataclass(frozen=True)
class Limits:
    """When a ratio counts as a measurement: the per-round ratios' spread is at most
    ``margin`` and the timed threads waited for a core at most ``max_cpu_wait`` of the
    time they were runnable (more means other work held the cores, which rounds that
    agree do not show)."""

    margin: float = DEFAULT_MARGIN
    max_cpu_wait: float = DEFAULT_MAX_CPU_WAIT


def compare(baseline: list[float], ours: list[float],
            margin: float = DEFAULT_MARGIN) -> dict[str, object]:
    """``baseline`` over ``ours`` (>1: ours faster) from interleaved rounds: the ratio of the
    median times, the range and spread of the per-round ratios, and whether that spread is
    within ``margin`` (steady) so the ratio can be reported as a measurement."""
    if len(baseline) != len(ours):
        raise ValueError(f"interleaved rounds must pair up: {len(baseline)} baseline rounds, "
                         f"{len(ours)} of ours")
    per_round = [theirs / mine for theirs, mine in zip(baseline, ours, strict=True)]
    spread = relative_spread(per_round)
    unsteady = [f"per-round ratios spread {spread:.0%} > {margin:.0%}"] if spread > margin \
        else []
    return {"ratio": statistics.median(baseline) / statistics.median(ours),
            "low": min(per_round), "high": max(per_round), "spread": spread,
            "steady": not unsteady, "unsteady_because": unsteady}


@dataclass(frozen=True)
class Rounds:
    """Seconds per call of each competitor in each round, and what else happened while they
    were timed: the 1-minute load average when timing began, the CPU wait share
    (:class:`CpuWaitMeter`; None: not reported by the kernel), and how many
    graphs torch.compile compiled (should be 0: a compile inside a timed round counts as
    that competitor's time)."""

    seconds: dict[str, list[float]]
    load_1min: float
    cpu_wait: float | None
    graphs_compiled: int

    def ms(self, name: str) -> float | None:
        """Median milliseconds of ``name``, None for a competitor that did not run."""
        seconds = self.seconds.get(name)
        return None if seconds is None else 1e3 * statistics.median(seconds)

    def compare(self, baseline: str, ours: str, limits: Limits) -> dict[str, object] | None:
        """:func:`compare` of two competitors (None if either did not run), unsteady also
        when the CPU wait exceeds the limit or torch.compile compiled while timing."""
        if baseline not in self.seconds or ours not in self.seconds:
            return None
        result = compare(self.seconds[baseline], self.seconds[ours], limits.margin)
        if self.cpu_wait is not None and self.cpu_wait > limits.max_cpu_wait:
            result["unsteady_because"].append(
                f"CPU wait {self.cpu_wait:.0%} > {limits.max_cpu_wait:.0%}")
        if self.graphs_compiled:
            result["unsteady_because"].append(
                f"{self.graphs_compiled} graph(s) compiled while timing")
        result["steady"] = not result["unsteady_because"]
        return result

    def rounds_ms(self) -> dict[str, list[float]]:
        return {name: [1e3 * value for value in seconds]
                for name, seconds in self.seconds.items()}


def interleaved_rounds(steps: dict[str, Step], rounds: int, warmup: int,
                       min_round_s: float) -> Rounds:
    """``warmup`` rounds of one call each, then ``rounds`` timed rounds in which every
    competitor runs back to back for at least ``min_round_s`` (at least one call; 0:
    exactly one call). The last warm-up call's time sets the calls per round."""
    last_call: dict[str, float] = {}
    for _ in range(warmup):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            last_call[name] = time.perf_counter() - start
    load, graphs = load_average(), graphs_compiled()
    calls = {name: _calls_per_round(run, min_round_s, last_call.get(name))
             for name, run in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    meter = CpuWaitMeter()
    for _ in range(rounds):
        for name, run in steps.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            times[name].append((time.perf_counter() - start) / calls[name])
    return Rounds(times, load, meter.share(), graphs_compiled() - graphs)


def relative_spread(values: list[float]) -> float:
    """Interquartile range over median (inclusive quartiles: half the range for 3 values)."""
    if len(values) < 2:
        raise ValueError(f"a spread needs at least 2 rounds, got {len(values)}")
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return (third - first) / statistics.median(values)


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after ``seconds`` (SIGALRM), or on leaving
    the block late: an alarm that lands in a weakref callback is swallowed there."""
    message = f"compile took longer than {seconds:.0f} s"

    def expire(signum, frame):
        raise CompileTimeout(message)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if time.perf_counter() - start > seconds:
        raise CompileTimeout(message)


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    """How many graph breaks torch.compile has met in this process so far."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


@contextlib.contextmanager
def compile_in_process() -> Iterator[None]:
    """Inductor compiles in the calling thread, with no pool of worker processes: workers
    start (and import torch) in the background and would run during timed rounds."""
    from torch._inductor import config
    with config.patch(compile_threads=1):
        yield


class Compiler:
    """torch.compile under one time budget (per section). ``warm_up`` compiles by calling
    the steps, so every compile is over before any of them is timed."""

    def __init__(self, budget_s: float | None, backend: str = "inductor"):
        self.remaining, self.backend = budget_s, backend

    @property
    def enabled(self) -> bool:
        return self.remaining is not None

    def compile(self, module: nn.Module) -> nn.Module:
        """Static shapes: each row measures kernels specialized to its own shapes."""
        return torch.compile(module, backend=self.backend, dynamic=False)

    def warm_up(self, make_steps: dict[str, Callable[[], Step]], calls: int = 2
                ) -> tuple[dict[str, Step], dict[str, str]]:
        """Each ``make_steps[name]()`` (which calls :meth:`compile`) built and called
        ``calls`` times within the budget left: the steps that compiled, and a note per
        name ("compiled in ... s, N graph breaks" or why not). Code compiled for earlier
        rows is dropped
        first, so no row inherits another's graphs, dynamic shapes or cache limit."""
        steps, notes = {}, {}
        if self.enabled and self.remaining > 0:
            torch._dynamo.reset()
        for name, make_step in make_steps.items():
            if not self.enabled:
                notes[name] = "n/a (--no-compile)"
                continue
            if self.remaining <= 0:
                notes[name] = "n/a (compile time budget spent)"
                continue
            start, breaks = time.perf_counter(), graph_breaks()
            try:
                with time_limit(self.remaining):
                    run = make_step()
                    for _ in range(calls):
                        run()
            except Exception as error:  # any compile failure is a result to report
                first_line = (str(error).splitlines() or [""])[0]
                notes[name] = f"n/a ({type(error).__name__}: {first_line[:80]})"
            else:
                steps[name] = run
                notes[name] = (f"compiled in {time.perf_counter() - start:.1f} s, "
                               f"{graph_breaks() - breaks} graph breaks")
            finally:
                self.remaining -= time.perf_counter() - start
        return steps, notes
