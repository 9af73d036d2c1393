"""Run a function on several local processes joined by a process group on loopback: gloo,
or NCCL with rank r on GPU ``r % device_count`` (ranks may share a GPU where NCCL allows it).

Each process writes what it measured to ``<out>/rank<r>.pt`` (or its traceback to
``<out>/rank<r>.err``); the parent process does the checking, so a failed comparison
is an ordinary pytest failure. Every run has an outer time bound: processes still alive
after it are killed and the run fails, so a hung collective can never hang the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Before any process group exists, as in batchnorm.examples.ddp_mnist: imported after
# one, it binds the group into argument defaults and keeps it into interpreter teardown.
import torch.distributed.nn.functional
import torch.multiprocessing as mp

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce",
               "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, timeout_s: float, out: str,
           target: Callable[..., Any], args: tuple, backend: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            os.environ.setdefault("NCCL_MULTI_RANK_GPU_ENABLE", "1")  # NCCL >= 2.30 reads it
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = target(rank, world_size, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(target: Callable[..., Any], world_size: int, out: Path, *args: Any,
                  timeout_s: float = 30.0, bound_s: float = 120.0,
                  backend: str = "gloo") -> list[Any]:
    """``target(rank, world_size, *args)`` on ``world_size`` spawned processes with a
    ``backend`` group whose collectives time out after ``timeout_s``; its return values by
    rank."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, timeout_s,
                                                      str(out), target, args, backend))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + bound_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    exit_codes = {rank: process.exitcode for rank, process in enumerate(processes)
                  if rank not in hung and process.exitcode != 0}
    errors = {rank: (out / f"rank{rank}.err").read_text()
              for rank in range(world_size) if (out / f"rank{rank}.err").exists()}
    if hung or exit_codes or errors:
        raise AssertionError(f"ranks {hung} still running after {bound_s} s (killed); "
                             f"non-zero exit codes {exit_codes}; errors: {errors}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives while installed (per process)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._originals = {name: getattr(dist, name) for name in COLLECTIVES
                           if hasattr(dist, name)}

    def __enter__(self) -> CollectiveCounter:
        for name, original in self._originals.items():
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(*args, **kwargs)
        return counted

    def take(self) -> list[str]:
        """The calls since the last take."""
        calls, self.calls = self.calls, []
        return calls
