"""What the spawned processes of the distributed tests run, and the cases they run.

Workers only compute and return tensors; every comparison happens in the test module.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from harness import CollectiveCounter
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchnorm.modules.batchnorm import BatchNorm2d
from batchnorm.modules.syncbn import SyncBatchNorm, convert_sync_batchnorm

STEPS = 3
LEARNING_RATE = 0.1
RENORM = {"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5},
          "activation": "relu"}


@dataclass(frozen=True)
class Case:
    """One input layout with per-rank batch sizes (the global batch is their concatenation)."""

    name: str
    sample_shape: tuple[int, ...]  # (C, *spatial)
    sizes: tuple[int, ...]  # batch size on each rank
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    offset: float = 0.0  # common offset of every value: Chan's merge must not lose the variance
    momentum: float | None = 0.1
    options: dict[str, Any] = field(default_factory=dict)  # variant options of the layer
    residual: bool = False  # layer(x, residual_of(x)): BN + residual add (+ activation)

    @property
    def tolerance(self) -> dict[str, float]:
        """float32: the issue's 1e-5. float64: 1e-9, or 1e-7 under a 1e6 offset, where
        torch's own float64 kernel is ~2e-8 off the exact weight gradient (ours ~2e-9)."""
        bound = 1e-5 if self.dtype == torch.float32 else 1e-7 if self.offset else 1e-9
        return {"rtol": bound, "atol": bound}


CASES = {
    2: [Case("NC-rank-of-zero", (5,), (6, 0)),
        Case("NCL-uneven", (3, 7), (3, 4)),
        Case("NCHW-rank-of-one", (4, 3, 5), (4, 1)),
        Case("NHWC-channels-last-float32", (4, 3, 5), (2, 5), torch.float32, True),
        # cumulative running average: eval input then sits near the running mean
        Case("NCHW-offset-1e6-cumulative-average", (3, 4, 4), (3, 3), offset=1e6,
             momentum=None),
        Case("NCHW-renorm-relu", (3, 4, 4), (5, 2), options=RENORM),
        Case("NHWC-residual-relu", (3, 4, 4), (5, 2), channels_last=True,
             options={"activation": "relu"}, residual=True)],
    3: [Case("NC-one-sample-and-zero", (5,), (1, 0, 4)),
        Case("NCL-rank-of-zero", (3, 6), (2, 0, 3)),
        Case("NCHW-first-rank-empty", (4, 3, 3), (0, 3, 2)),
        Case("NHWC-channels-last-float32", (4, 3, 5), (3, 1, 2), torch.float32, True),
        Case("NHWC-renorm-relu-rank-of-zero", (3, 4, 4), (4, 0, 3), channels_last=True,
             options=RENORM)],
}
GHOST_SIZES = {2: (6, 4), 3: (4, 0, 6)}  # per rank; ghost batches of 2 samples
# Two NCCL processes (sharing one GPU when there is only one).
NCCL_CASES = [Case("NCHW-uneven", (3, 7), (3, 4)),
              Case("NHWC-channels-last-float32", (4, 3, 5), (2, 5), torch.float32, True),
              Case("NCHW-offset-1e6-cumulative-average", (3, 4, 4), (3, 3), offset=1e6,
                   momentum=None),
              Case("NCHW-renorm-relu", (3, 4, 4), (5, 2), options=RENORM),
              Case("NHWC-residual-relu", (3, 4, 4), (5, 2), channels_last=True,
                   options={"activation": "relu"}, residual=True)]


def global_batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's concatenated input and the upstream gradient direction ``t``."""
    generator = torch.Generator().manual_seed(1000 * step + len(case.name))
    shape = (sum(case.sizes), *case.sample_shape)
    channel_scale = torch.linspace(0.5, 3.0, case.sample_shape[0], dtype=torch.float64)
    channel_scale = channel_scale.view(-1, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * channel_scale
    x = x + channel_scale + case.offset
    t = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(case.dtype), t.to(case.dtype)


def residual_of(x: torch.Tensor) -> torch.Tensor:
    """The shortcut a residual case adds: a function of the input, so each rank can make
    its share of it."""
    return torch.cos(x.detach()).requires_grad_()


def initial_affine(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    channels = case.sample_shape[0]
    weight = 1 + 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    return weight.to(case.dtype), bias.to(case.dtype)


def set_affine(layer: nn.Module, case: Case) -> None:
    with torch.no_grad():
        for parameter, value in zip((layer.weight, layer.bias), initial_affine(case),
                                    strict=True):
            parameter.copy_(value)


def _rank_part(case: Case, tensor: torch.Tensor, rank: int, device: str) -> torch.Tensor:
    part = tensor.split(case.sizes)[rank].to(device, copy=True)
    return part.contiguous(memory_format=torch.channels_last) if case.channels_last else part


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def train_case(rank: int, world_size: int, case: Case, device: str = "cpu") -> dict[str, Any]:
    """A DDP-wrapped SyncBatchNorm on ``device`` trained for a few SGD steps on this rank's
    share of the case's global batches, then an eval forward; the loss is scaled by
    world_size so that DDP's averaged gradient is the gradient of the single-process loss
    on the concatenated batch. Tensors come back on the CPU."""
    layer = SyncBatchNorm(case.sample_shape[0], momentum=case.momentum, dtype=case.dtype,
                          device=device, **case.options)
    set_affine(layer, case)
    model = DistributedDataParallel(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    steps = []
    for step in range(STEPS):
        x, t = (_rank_part(case, tensor, rank, device) for tensor in global_batch(case, step))
        x.requires_grad_()
        residual = residual_of(x) if case.residual else None
        y = model(x, residual)
        (world_size * (y * t).sum()).backward()
        steps.append({"y": _host(y), "x_grad": _host(x.grad) / world_size,
                      "weight_grad": _host(layer.weight.grad),
                      "bias_grad": _host(layer.bias.grad),
                      "channels_last": y.is_contiguous(memory_format=torch.channels_last)})
        if residual is not None:
            steps[-1]["residual_grad"] = _host(residual.grad) / world_size
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        x = _rank_part(case, global_batch(case, STEPS)[0], rank, device)
        eval_y = model(x, residual_of(x) if case.residual else None)
    return {"steps": steps, "eval_y": _host(eval_y), "running_mean": _host(layer.running_mean),
            "running_var": _host(layer.running_var),
            "num_batches_tracked": int(layer.num_batches_tracked)}


def parity_worker(rank: int, world_size: int, cases: list[Case]) -> dict[str, Any]:
    """Single-step checks, then :func:`train_case` for each case (gloo, CPU)."""
    results = {"collectives": count_collectives(rank),
               "ghost": ghost_step(rank, GHOST_SIZES[world_size])}
    for case in cases:
        results[case.name] = train_case(rank, world_size, case)
    return results


def nccl_worker(rank: int, world_size: int, cases: list[Case]) -> dict[str, Any]:
    """:func:`train_case` for each case on this rank's GPU (NCCL)."""
    return {case.name: train_case(rank, world_size, case, "cuda") for case in cases}


def count_collectives(rank: int) -> dict[str, Any]:
    """Which torch.distributed collectives each phase of a plain SyncBatchNorm step calls."""
    layer = SyncBatchNorm(4, dtype=torch.float64)
    calls: dict[str, Any] = {}
    with CollectiveCounter() as counter:
        x = torch.randn(3 + rank, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        layer(x.detach())
        calls["first_forward"] = counter.take()
        y = layer(x)
        calls["train_forward"] = counter.take()
        y.sum().backward()
        calls["train_backward"] = counter.take()
        layer(x.detach()).sum()  # no input gradient: the backward needs no statistics sums
        calls["forward_without_input_grad"] = counter.take()
        layer.eval()
        layer(x).sum().backward()
        calls["eval_forward_and_backward"] = counter.take()
    layer.train()
    try:
        layer(torch.randn(1 if rank == 0 else 0, 4, dtype=torch.float64))
        calls["one_value_in_global_batch"] = "no error"
    except ValueError as error:
        calls["one_value_in_global_batch"] = str(error)
    return calls


def ghost_step(rank: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    """One training step of SyncBatchNorm(ghost_batch_size=2) and of the local
    BatchNorm2d(ghost_batch_size=2) on the same input: ghost chunks are per process."""
    torch.manual_seed(rank)
    x = torch.randn(sizes[rank], 3, 4, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    result: dict[str, Any] = {}
    for name, cls in (("synced", SyncBatchNorm), ("local", BatchNorm2d)):
        layer = cls(3, dtype=torch.float64, ghost_batch_size=2)
        inputs = x.clone().requires_grad_()
        with CollectiveCounter() as counter:
            (layer(inputs) * t).sum().backward()
        result[name] = {"x_grad": inputs.grad, "weight_grad": layer.weight.grad,
                        "running_var": layer.running_var, "calls": counter.calls}
    return result


def timeout_worker(rank: int, world_size: int, release: Any) -> dict[str, Any]:
    """Rank 1 skips the layer; rank 0 must get an error naming it after the group timeout."""
    model = convert_sync_batchnorm(nn.Sequential(OrderedDict(
        stem=nn.Conv2d(1, 3, 1), block=nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(3))))))
    if rank == 1:
        release.wait(60)  # stay alive (a dead peer fails fast; this tests the timeout)
        return {}
    start = time.monotonic()
    try:
        model(torch.randn(4, 1, 3, 3))
        outcome = "completed"
    except RuntimeError as error:
        outcome = str(error)
    elapsed = time.monotonic() - start
    release.set()
    return {"outcome": outcome, "elapsed": elapsed}


def mismatch_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1 builds its layer with more channels, then (a fresh layer) feeds float64 where
    rank 0 feeds float32; each rank reports its error and whether its state stayed."""
    results = {}
    for kind in ("channels", "dtype"):
        channels = 4 + rank if kind == "channels" else 4
        dtype = torch.float64 if kind == "dtype" and rank == 1 else torch.float32
        model = convert_sync_batchnorm(nn.Sequential(OrderedDict(block=nn.Sequential(
            OrderedDict(bn=nn.BatchNorm2d(channels, dtype=dtype))))))
        layer = model.block.bn
        before = layer.running_var.clone()
        try:
            model(torch.randn(3 + rank, channels, 2, 2, dtype=dtype))
            outcome = "completed"
        except ValueError as error:
            outcome = str(error)
        results[kind] = {"outcome": outcome,
                         "running_var_unchanged": torch.equal(layer.running_var, before),
                         "num_batches_tracked": int(layer.num_batches_tracked)}
    return results


def mode_mismatch_worker(rank: int, world_size: int, release: Any, timeout: float
                         ) -> dict[str, Any]:
    """Rank 1 runs the model in eval mode, rank 0 trains: rank 0 must fail after the
    layer's own ``timeout``, well before the process group's."""
    model = convert_sync_batchnorm(nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(3))),
                                   timeout=timeout)
    start = time.monotonic()
    try:
        model.train(rank == 0)(torch.randn(4, 3, 2, 2))
        outcome = "completed"
    except RuntimeError as error:
        outcome = str(error)
    elapsed = time.monotonic() - start
    if rank == 1:
        release.wait(60)  # stay alive (a dead peer fails fast; this tests the timeout)
    else:
        release.set()
    return {"outcome": outcome, "elapsed": elapsed}
