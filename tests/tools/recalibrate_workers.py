"""Process entry points for the distributed recalibration test (imported by name in each
spawned process)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from batchnorm.tools import recalibrate


def recalibrate_shard(rank: int, world_size: int, port: int, data: torch.Tensor,
                      out_dir: Path) -> None:
    """Recalibrates a BatchNorm1d on every ``world_size``-th row of ``data`` (uneven batch
    sizes and counts per rank) and saves its running statistics to ``rank<r>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        bn = nn.BatchNorm1d(3).double()
        shard = data[rank::world_size]
        recalibrate(bn, list(shard.split(3 + rank)))
        torch.save((bn.running_mean, bn.running_var), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
