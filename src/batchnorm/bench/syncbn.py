"""SyncBatchNorm vs local BatchNorm: step time on 2 CPU processes (gloo on loopback).

Both layers run in the same setting (2 processes, one thread each, a (32, 64, 56, 56)
float32 input per process, forward + backward), so the ratio is the cost of the
synchronization alone. Also counts the torch.distributed collectives of one SyncBN
step (target: one in forward, one in backward).

    python -m batchnorm.bench.syncbn [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchnorm import BatchNorm2d, SyncBatchNorm
from batchnorm.bench import measure as timing

SHAPE = (32, 64, 56, 56)
WORLD_SIZE = 2
_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce",
                "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier")


def _step_seconds(layers: dict[str, torch.nn.Module], x: torch.Tensor, grad: torch.Tensor,
                  repeats: int) -> tuple[dict[str, list[float]], float | None]:
    """Forward+backward seconds per layer and step after two warm-up steps (the layers take
    turns step by step so that drifting machine load hits them alike), and the CPU wait
    share over the timed steps."""
    for _ in range(2):
        for layer in layers.values():
            layer(x).backward(grad)
    times: dict[str, list[float]] = {name: [] for name in layers}
    meter = timing.CpuWaitMeter()
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            layer(x).backward(grad)
            times[name].append(time.perf_counter() - start)
    return times, meter.share()


def _count_calls(step: Callable[[], Any]) -> tuple[Any, int]:
    """``step()``'s result and how many torch.distributed collectives it called."""
    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        return step(), len(calls)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _worker(rank: int, port: int, repeats: int, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(rank)
        x = torch.randn(SHAPE, requires_grad=True)
        grad = torch.randn(SHAPE)
        synced, local = SyncBatchNorm(SHAPE[1]), BatchNorm2d(SHAPE[1])
        y, forward_calls = _count_calls(lambda: synced(x))
        _, backward_calls = _count_calls(lambda: y.backward(grad))
        load = timing.load_average()
        seconds, cpu_wait = _step_seconds({"syncbn": synced, "local": local}, x, grad,
                                          repeats)
        if rank == 0:
            results.put({"seconds": seconds, "load_1min": load, "cpu_wait": cpu_wait,
                         "collectives_forward": forward_calls,
                         "collectives_backward": backward_calls})
    finally:
        dist.destroy_process_group()


def measure(quick: bool = False, limits: timing.Limits | None = None) -> dict[str, Any]:
    """Median forward+backward step time (ms) of SyncBatchNorm and of local BatchNorm2d
    on each of 2 processes, their ratio (with its spread over the steps), and the
    collectives per SyncBN step."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=_worker, args=(rank, port, 3 if quick else 20, results))
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(600)
    failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
    for rank in failed:
        processes[rank].kill()
    if failed or results.empty():
        raise RuntimeError(f"SyncBatchNorm benchmark: processes {failed} failed or hung")
    result = results.get()
    timed = timing.Rounds(result["seconds"], result["load_1min"], result["cpu_wait"], 0)
    return {"shape": list(SHAPE), "processes": WORLD_SIZE, "threads_per_process": 1,
            "syncbn_ms": timed.ms("syncbn"), "local_ms": timed.ms("local"),
            "ratio": timed.compare("syncbn", "local", limits or timing.Limits()),
            "load_1min": timed.load_1min, "cpu_wait": timed.cpu_wait,
            "rounds_ms": timed.rounds_ms(),
            "collectives_forward": result["collectives_forward"],
            "collectives_backward": result["collectives_backward"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 20")
    print(json.dumps(measure(parser.parse_args().quick), indent=2))
