"""The core's statistics and gradient reducers on ``torch.distributed`` collectives.

One collective per training forward and one per backward, device-agnostic (gloo on CPU,
NCCL on CUDA), no transport of our own:

* forward: ``all_gather`` of each process's ``(count, mean, M2)`` per channel, merged
  locally with Chan et al.'s parallel formula in float64::

      N = sum_i n_i,   mean = sum_i n_i mean_i / N,
      M2 = sum_i (M2_i + n_i (mean_i - mean)^2),   var = M2 / N

  exact for uneven batch sizes (a process with n_i = 0 contributes nothing) and free of
  the cancellation that summing raw squares suffers under a large common offset;
* backward: ``all_reduce`` (sum) of the two per-channel sums the input gradient needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProcessGroupReducer", "sync_world_size"]


def sync_world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``process_group`` (default: the world), 1 when torch.distributed is
    unavailable or not initialized, so that callers fall back to local statistics."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class ProcessGroupReducer:
    """Merges batch statistics and sums gradient partials over ``process_group``.

    ``layer`` names the layer in errors: when a collective fails (the process group's
    timeout expired because another process skipped this layer, or a peer died), the
    error says which layer was waiting instead of only the backend's message.
    """

    def __init__(self, process_group: dist.ProcessGroup | None, layer: str) -> None:
        self.process_group = process_group
        self.layer = layer

    def merge_moments(self, mean: Tensor, var: Tensor, count: int
                      ) -> tuple[Tensor, Tensor, int]:
        """Statistics of the global batch from this process's ``count`` values per group."""
        local = torch.cat([mean.new_full((1,), count, dtype=torch.float64),
                           mean.reshape(-1).double(), var.reshape(-1).double() * count])
        world = sync_world_size(self.process_group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        self._run("the forward all_gather of batch statistics",
                  lambda: dist.all_gather(gathered, local, group=self.process_group))
        stacked = torch.stack(gathered)
        counts, means, m2s = stacked[:, :1], *stacked[:, 1:].chunk(2, dim=1)
        total = counts.sum()
        total_count = int(total.item())
        if total_count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 "
                             f"value in the batch of all {world} processes ({self.layer})")
        global_mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - global_mean).square()).sum(0)
        return (global_mean.reshape(mean.shape).to(mean.dtype),
                (m2 / total).reshape(var.shape).to(var.dtype), total_count)

    def sum_(self, *tensors: Tensor) -> None:
        """Sums ``tensors`` in place over the process group with one ``all_reduce``."""
        packed = torch.cat([tensor.reshape(-1).double() for tensor in tensors])
        self._run("the backward all_reduce of gradient sums",
                  lambda: dist.all_reduce(packed, group=self.process_group))
        for tensor, summed in zip(tensors, packed.split([t.numel() for t in tensors]),
                                  strict=True):
            tensor.copy_(summed.view_as(tensor))

    def _run(self, what: str, collective: Callable[[], object]) -> None:
        try:
            collective()
        except RuntimeError as error:
            world = sync_world_size(self.process_group)
            raise RuntimeError(
                f"{self.layer} failed waiting in {what} across {world} processes: another "
                "process skipped this layer, ran a different number of steps, or died "
                f"(the process group's timeout bounds the wait). Backend error: {error}"
            ) from error
