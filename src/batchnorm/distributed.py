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

Before a layer's first synchronized forward (and whenever its input's channels or dtype
change) one small ``all_gather`` checks that every process feeds the same number of
channels in the same dtype: mismatched collectives would otherwise abort inside the
backend or merge unrelated numbers. Every collective waits at most the reducer's
``timeout`` (with NCCL a finite timeout makes the CPU wait for the collective).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProcessGroupReducer", "sync_world_size"]

_MAX_DIMS = 8  # dims of each process's input shape reported by the agreement check
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sync_world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``process_group`` (default: the world), 1 when torch.distributed is
    unavailable or not initialized, so that callers fall back to local statistics."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class ProcessGroupReducer:
    """Merges batch statistics and sums gradient partials over ``process_group``.

    ``layer`` names the layer in errors: when a collective fails (``timeout`` seconds, or
    the process group's timeout if shorter, expired because another process is in eval
    mode or skipped this layer, or a peer died), the error says which layer was waiting
    instead of only the backend's message. ``timeout=None`` leaves the bound to the group.
    """

    def __init__(self, process_group: dist.ProcessGroup | None, layer: str,
                 timeout: float | None = None) -> None:
        self.process_group = process_group
        self.layer = layer
        self.timeout = timeout

    def check_inputs_agree(self, input: Tensor) -> None:
        """Raise ValueError on every process unless all of them feed ``input`` with the same
        number of channels (dim 1) and dtype, naming each process's shape and dtype."""
        signature = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.int64, device=input.device)
        signature[0] = input.shape[1]
        signature[1] = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else -1
        signature[2] = input.dim()
        shape = input.shape[:_MAX_DIMS]
        signature[3:3 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        world = sync_world_size(self.process_group)
        gathered = [torch.empty_like(signature) for _ in range(world)]
        self._run("the forward all_gather that checks the input channels and dtype",
                  lambda: dist.all_gather(gathered, signature, group=self.process_group,
                                          async_op=True))
        signatures = [row.tolist() for row in gathered]
        if len({(row[0], row[1]) for row in signatures}) == 1:
            return
        processes = ", ".join(f"rank {rank}: {_describe(row)}"
                              for rank, row in enumerate(signatures))
        raise ValueError(f"{self.layer}: every process must feed the same number of channels "
                         f"in the same dtype, got {processes}")

    def merge_moments(self, mean: Tensor, var: Tensor, count: int
                      ) -> tuple[Tensor, Tensor, int]:
        """Statistics of the global batch from this process's ``count`` values per group."""
        local = torch.cat([mean.new_full((1,), count, dtype=torch.float64),
                           mean.reshape(-1).double(), var.reshape(-1).double() * count])
        world = sync_world_size(self.process_group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        self._run("the forward all_gather of batch statistics",
                  lambda: dist.all_gather(gathered, local, group=self.process_group,
                                          async_op=True))
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
                  lambda: dist.all_reduce(packed, group=self.process_group, async_op=True))
        for tensor, summed in zip(tensors, packed.split([t.numel() for t in tensors]),
                                  strict=True):
            tensor.copy_(summed.view_as(tensor))

    def _run(self, what: str, collective: Callable[[], dist.Work]) -> None:
        """Start ``collective`` (an ``async_op=True`` call) and wait for it, at most
        ``timeout`` seconds."""
        try:
            work = collective()
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:
            world = sync_world_size(self.process_group)
            bound = "the process group's timeout" if self.timeout is None else \
                f"the layer's timeout of {self.timeout:g} s, or the process group's if shorter"
            raise RuntimeError(
                f"{self.layer} failed waiting in {what} across {world} processes: another "
                "process did not join it. Most likely it is in eval mode while this one "
                "trains (call .train() or .eval() on every process), skipped this layer, "
                f"ran a different number of steps, or died (the wait is bounded by {bound}). "
                f"Backend error: {error}"
            ) from error


def _describe(signature: list[int]) -> str:
    """``(N, C, ...) dtype`` from an agreement-check row (-1 marks an unused slot)."""
    ndim = signature[2]
    shape = signature[3:3 + min(ndim, _MAX_DIMS)] + (["..."] if ndim > _MAX_DIMS else [])
    dtype = str(_DTYPES[signature[1]]).removeprefix("torch.") if signature[1] >= 0 else \
        "a non-float dtype"
    return f"({', '.join(map(str, shape))}) {dtype}"
