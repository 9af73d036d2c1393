"""Precise BatchNorm statistics (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

A running average with momentum estimates the population statistics from the last few
batches, seen while the weights were still moving; a too-high momentum leaves a gap
between training and evaluation. Recalibration runs the trained model in training mode
over many batches with its parameters untouched and replaces each BatchNorm's running
buffers by the exact statistics of every value it saw.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

__all__ = ["PopulationMoments", "recalibrate"]


class PopulationMoments:
    """Exact per-channel count, mean and sum of squared deviations (``M2``) of all values
    seen, merged batch by batch (and process by process) with Chan et al.'s formula:

        delta = mean_b - mean;  n' = n + n_b
        mean' = mean + delta * n_b / n';  M2' = M2 + M2_b + delta**2 * n * n_b / n'

    in float64, so the result does not depend on how the data was split into batches."""

    def __init__(self, channels: int, device: torch.device | None = None) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    @torch.no_grad()
    def update(self, input: Tensor, axis: int) -> None:
        """Adds every value of ``input``, per channel ``axis``."""
        values = input.detach().movedim(axis, -1).reshape(-1, input.shape[axis]).double()
        mean = values.mean(0)
        self.merge(values.shape[0], mean, (values - mean).square().sum(0))

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Merges the moments of every process of ``group`` (each process must call it)."""
        local = torch.stack([torch.full_like(self.mean, float(self.count)), self.mean,
                             self.m2])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        self.count = 0
        for count, mean, m2 in gathered:
            self.merge(int(count[0].item()), mean, m2)

    def unbiased_var(self) -> Tensor:
        """``M2 / (count - 1)``: the unbiased estimate, as torch stores in ``running_var``."""
        return self.m2 / (self.count - 1)


def _first_tensor(batch: object) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError("recalibrate: each item of batches must be a tensor or an "
                    f"(input, target) tuple, got {type(batch).__name__}")


def _device(model: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if tensor is None else tensor.device


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[object], num_batches: int = 200, *,
                process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Sets the running statistics of every BatchNorm in ``model`` to the exact population
    statistics of its input over the first ``num_batches`` of ``batches``, in place.

    ``batches`` yields tensors or ``(input, target, ...)`` tuples (a DataLoader works).
    The model runs in training mode (as in training, so each layer sees the features it
    was trained on) under ``no_grad``; parameters are never touched. ``running_mean``
    becomes the mean of all values a layer saw and ``running_var`` their unbiased variance
    ``M2 / (count - 1)`` — the same convention as torch's per-batch update. With
    torch.distributed initialized, the statistics are merged over ``process_group``
    (every process must call this; with SyncBatchNorm, whose forward synchronizes, over
    the same number of batches), which is what SyncBatchNorm needs. Training mode and
    momentum are restored afterwards; ``num_batches_tracked`` counts the batches run.
    Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError("recalibrate: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate: num_batches must be a positive int, got {num_batches!r}")
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, _BatchNorm) and module.running_mean is not None
              and module.running_var is not None}
    if not layers:
        warnings.warn("recalibrate: the model has no BatchNorm with running statistics; "
                      "nothing to do", stacklevel=2)
        return model
    moments: dict[str, PopulationMoments] = {}

    def record(name: str, module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
        input = args[0]
        axis = getattr(module, "axis", 1) % input.dim()
        if name not in moments:  # sized here: a lazy layer knows its channels only now
            moments[name] = PopulationMoments(input.shape[axis], input.device)
        moments[name].update(input, axis)

    modes = {module: module.training for module in model.modules()}
    momenta = {name: module.momentum for name, module in layers.items()}
    handles = [module.register_forward_pre_hook(functools.partial(record, name))
               for name, module in layers.items()]
    device = _device(model)
    seen = 0
    try:
        for module in layers.values():
            module.momentum = 0.0  # the layer's own running update becomes a no-op
        model.train()
        for batch in itertools.islice(batches, num_batches):
            input = _first_tensor(batch)
            model(input if device is None else input.to(device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            module.momentum = momenta[name]
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("recalibrate: batches yielded no batch")
    distributed = dist.is_available() and dist.is_initialized()
    for name, module in layers.items():
        if is_lazy(module.running_mean):
            warnings.warn(f"recalibrate: lazy BatchNorm {name!r} was never called, so it "
                          "has no running statistics to set", stacklevel=2)
            continue
        population = moments.get(name) or PopulationMoments(module.running_mean.numel(),
                                                             module.running_mean.device)
        if distributed:
            population.all_reduce(process_group)
        if population.count < 2:
            warnings.warn(f"recalibrate: BatchNorm {name!r} saw "
                          f"{population.count} values per channel; its running statistics "
                          "were left unchanged", stacklevel=2)
            continue
        module.running_mean.copy_(population.mean)
        module.running_var.copy_(population.unbiased_var())
    return model
