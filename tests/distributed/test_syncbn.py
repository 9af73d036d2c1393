"""SyncBatchNorm across 2 and 3 gloo processes against torch.nn.BatchNorm on the
concatenated batch: outputs, input gradients, weight/bias gradients after DDP's
all-reduce, running statistics over several SGD steps, eval mode afterwards, and the
number of collectives per step.

Each world size is spawned once per module (spawning is the slow part) and runs every
case; the checks happen here, in the pytest process. Tolerances: float64 cases 1e-9
(relative and absolute), float32 cases 1e-5, the acceptance bound of the issue.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import CollectiveCounter, run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchnorm.modules.syncbn import SyncBatchNorm, convert_sync_batchnorm

STEPS = 3
LEARNING_RATE = 0.1


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
             momentum=None)],
    3: [Case("NC-one-sample-and-zero", (5,), (1, 0, 4)),
        Case("NCL-rank-of-zero", (3, 6), (2, 0, 3)),
        Case("NCHW-first-rank-empty", (4, 3, 3), (0, 3, 2)),
        Case("NHWC-channels-last-float32", (4, 3, 5), (3, 1, 2), torch.float32, True)],
}


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


def initial_affine(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    channels = case.sample_shape[0]
    weight = 1 + 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    return weight.to(case.dtype), bias.to(case.dtype)


def _rank_part(case: Case, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    part = tensor.split(case.sizes)[rank].clone()
    return part.contiguous(memory_format=torch.channels_last) if case.channels_last else part


def parity_worker(rank: int, world_size: int, cases: list[Case]) -> dict[str, Any]:
    """Counts the collectives of a plain SyncBatchNorm step, then trains a DDP-wrapped
    SyncBatchNorm for a few SGD steps on this rank's share of each case's global batches;
    the loss is scaled by world_size so that DDP's averaged gradient is the gradient of
    the single-process loss on the concatenated batch."""
    results = {"collectives": count_collectives(rank)}
    for case in cases:
        layer = SyncBatchNorm(case.sample_shape[0], momentum=case.momentum, dtype=case.dtype)
        with torch.no_grad():
            for parameter, value in zip((layer.weight, layer.bias), initial_affine(case),
                                        strict=True):
                parameter.copy_(value)
        model = DistributedDataParallel(layer)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        steps = []
        for step in range(STEPS):
            x, t = (_rank_part(case, tensor, rank) for tensor in global_batch(case, step))
            x.requires_grad_()
            y = model(x)
            (world_size * (y * t).sum()).backward()
            steps.append({"y": y.detach(), "x_grad": x.grad / world_size,
                          "weight_grad": layer.weight.grad.clone(),
                          "bias_grad": layer.bias.grad.clone(),
                          "channels_last": y.is_contiguous(memory_format=torch.channels_last)})
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            eval_y = model(_rank_part(case, global_batch(case, STEPS)[0], rank))
        results[case.name] = {"steps": steps, "eval_y": eval_y,
                              "running_mean": layer.running_mean.clone(),
                              "running_var": layer.running_var.clone(),
                              "num_batches_tracked": int(layer.num_batches_tracked)}
    return results


def reference_run(case: Case) -> dict[str, Any]:
    """The same training on one process: torch.nn.BatchNorm on the concatenated batch."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(case.sample_shape) + 1]
    layer = cls(case.sample_shape[0], momentum=case.momentum, dtype=case.dtype)
    with torch.no_grad():
        for parameter, value in zip((layer.weight, layer.bias), initial_affine(case),
                                    strict=True):
            parameter.copy_(value)
    optimizer = torch.optim.SGD(layer.parameters(), lr=LEARNING_RATE)
    steps = []
    for step in range(STEPS):
        x, t = global_batch(case, step)
        x.requires_grad_()
        y = layer(x)
        (y * t).sum().backward()
        steps.append({"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad.clone(),
                      "bias_grad": layer.bias.grad.clone()})
        optimizer.step()
        optimizer.zero_grad()
    # Eval output in float64 math from the trained state: torch's eval kernel folds the
    # statistics into x * scale + shift, which loses digits under a large offset.
    x = global_batch(case, STEPS)[0].double()
    per_channel = (-1, *([1] * (x.dim() - 2)))
    state = {name: tensor.detach().double().view(per_channel) for name, tensor in
             (("mean", layer.running_mean), ("var", layer.running_var),
              ("weight", layer.weight), ("bias", layer.bias))}
    eval_y = (x - state["mean"]) / torch.sqrt(state["var"] + layer.eps) * state["weight"] + \
        state["bias"]
    return {"steps": steps, "eval_y": eval_y.to(case.dtype), "running_mean": layer.running_mean,
            "running_var": layer.running_var}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    """``spawned(world_size)``: every rank's results of :func:`parity_worker` on
    ``CASES[world_size]``, spawned once per module and world size."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def results(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"world{world_size}")
            cache[world_size] = run_processes(parity_worker, world_size, out, CASES[world_size])
        return cache[world_size]

    return results


@pytest.mark.parametrize("case", [case for world in sorted(CASES) for case in CASES[world]],
                         ids=lambda case: f"{len(case.sizes)}-processes-{case.name}")
def test_training_steps_match_single_process_batchnorm_on_concatenated_batch(
        case: Case, spawned: Callable[[int], list[dict[str, Any]]]) -> None:
    ranks = [rank_results[case.name] for rank_results in spawned(len(case.sizes))]
    reference = reference_run(case)
    for step, expected in enumerate(reference["steps"]):
        for key in ("y", "x_grad"):
            got = torch.cat([rank["steps"][step][key] for rank in ranks])
            torch.testing.assert_close(got, expected[key], **case.tolerance,
                                       msg=lambda m, k=key, s=step: f"{k} at step {s}: {m}")
        for rank, rank_results in enumerate(ranks):
            for key in ("weight_grad", "bias_grad"):
                torch.testing.assert_close(
                    rank_results["steps"][step][key], expected[key], **case.tolerance,
                    msg=lambda m, k=key, s=step, r=rank: f"{k} on rank {r}, step {s}: {m}")
            if len(case.sample_shape) == 3 and case.sizes[rank] > 0:
                assert rank_results["steps"][step]["channels_last"] == case.channels_last, \
                    f"output memory format on rank {rank}"
    for rank_results in ranks:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(rank_results[key], reference[key], **case.tolerance)
        assert rank_results["num_batches_tracked"] == STEPS
    torch.testing.assert_close(torch.cat([rank["eval_y"] for rank in ranks]),
                               reference["eval_y"], **case.tolerance)


def count_collectives(rank: int) -> dict[str, Any]:
    """Which torch.distributed collectives each phase of a plain SyncBatchNorm step calls."""
    layer = SyncBatchNorm(4, dtype=torch.float64)
    calls: dict[str, Any] = {}
    with CollectiveCounter() as counter:
        x = torch.randn(3 + rank, 4, 5, 5, dtype=torch.float64, requires_grad=True)
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


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_one_collective_in_forward_one_in_backward_none_in_eval(
        world_size: int, spawned: Callable[[int], list[dict[str, Any]]]) -> None:
    for rank, results in enumerate(spawned(world_size)):
        calls = results["collectives"]
        assert calls["train_forward"] == ["all_gather"], rank
        assert calls["train_backward"] == ["all_reduce"], rank
        assert calls["forward_without_input_grad"] == ["all_gather"], rank
        assert calls["eval_forward_and_backward"] == [], rank


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_one_value_in_the_global_batch_raises_on_every_rank(
        world_size: int, spawned: Callable[[int], list[dict[str, Any]]]) -> None:
    for rank, results in enumerate(spawned(world_size)):
        message = results["collectives"]["one_value_in_global_batch"]
        assert "Expected more than 1 value per channel" in message, (rank, message)


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


def test_skipped_layer_on_another_rank_raises_naming_the_layer_within_the_timeout(
        tmp_path: Path) -> None:
    timeout_s, margin_s = 2.0, 5.0
    release = torch.multiprocessing.get_context("spawn").Event()
    result = run_processes(timeout_worker, 2, tmp_path, release, timeout_s=timeout_s,
                           bound_s=60.0)[0]
    assert "SyncBatchNorm 'block.bn'" in result["outcome"], result["outcome"]
    assert "forward all_gather" in result["outcome"]
    assert timeout_s * 0.9 <= result["elapsed"] <= timeout_s + margin_s, result["elapsed"]
