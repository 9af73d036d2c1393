"""SyncBatchNorm across 2 and 3 gloo processes against single-process BatchNorm on the
concatenated batch (torch.nn's; our local layer for the renorm, activation and residual
variants, which torch lacks): outputs, input (and residual) gradients, weight/bias
gradients after DDP's all-reduce, running statistics over several SGD steps, eval mode
afterwards; the collectives per step; ghost batches staying per process; the timeout
error. On CUDA the training cases also run across 2 NCCL processes sharing one GPU
(skipped with a loud reason without CUDA, or with an NCCL that refuses two ranks on one
GPU).

Each world size is spawned once per module (spawning is the slow part) and runs every
case; the checks happen here, in the pytest process. Tolerances: see ``Case.tolerance``
(float32 1e-5, the acceptance bound of the issue; float64 1e-9).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import run_processes
from torch import nn
from workers import (
    CASES,
    LEARNING_RATE,
    NCCL_CASES,
    STEPS,
    Case,
    global_batch,
    mismatch_worker,
    mode_mismatch_worker,
    nccl_worker,
    parity_worker,
    residual_of,
    set_affine,
    timeout_worker,
)

from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d


def reference_run(case: Case) -> dict[str, Any]:
    """The same training in one process on the concatenated batch."""
    classes = (BatchNorm1d, BatchNorm2d) if case.options else (nn.BatchNorm1d, nn.BatchNorm2d)
    layer = classes[len(case.sample_shape) == 3](case.sample_shape[0], momentum=case.momentum,
                                                 dtype=case.dtype, **case.options)
    set_affine(layer, case)
    optimizer = torch.optim.SGD(layer.parameters(), lr=LEARNING_RATE)
    steps = []
    for step in range(STEPS):
        x, t = global_batch(case, step)
        x.requires_grad_()
        residual = residual_of(x) if case.residual else None
        y = layer(x) if residual is None else layer(x, residual)
        (y * t).sum().backward()
        steps.append({"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad.clone(),
                      "bias_grad": layer.bias.grad.clone()})
        if residual is not None:
            steps[-1]["residual_grad"] = residual.grad
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
    if case.residual:
        eval_y = eval_y + torch.cos(x)
    if case.options.get("activation") == "relu":
        eval_y = eval_y.relu()
    return {"steps": steps, "eval_y": eval_y.to(case.dtype), "running_mean": layer.running_mean,
            "running_var": layer.running_var}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    """``spawned(world_size)``: every rank's results of ``parity_worker`` on
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
    check_training(case, [rank_results[case.name] for rank_results in
                          spawned(len(case.sizes))])


def nccl_skip_reason() -> str | None:
    """Why the NCCL test cannot run here, or None."""
    if not torch.cuda.is_available():
        return "NO CUDA DEVICE: the NCCL SyncBatchNorm test needs a GPU"
    if not dist.is_nccl_available():
        return "NCCL NOT AVAILABLE in this torch build"
    version = torch.cuda.nccl.version()
    if torch.cuda.device_count() < 2 and version < (2, 30):
        return (f"NCCL {'.'.join(map(str, version))} refuses two ranks on one GPU (its "
                "NCCL_MULTI_RANK_GPU_ENABLE needs NCCL >= 2.30); two GPUs would do")
    return None


@pytest.mark.skipif(nccl_skip_reason() is not None, reason=str(nccl_skip_reason()))
def test_nccl_two_processes_match_single_process_batchnorm(tmp_path: Path) -> None:
    """The same training on CUDA tensors across 2 NCCL processes (sharing the GPU when
    there is one), against the single-process float64 math on CPU."""
    ranks = run_processes(nccl_worker, 2, tmp_path, NCCL_CASES, backend="nccl",
                          timeout_s=120.0, bound_s=600.0)
    for case in NCCL_CASES:
        check_training(case, [rank_results[case.name] for rank_results in ranks])


def check_training(case: Case, ranks: list[dict[str, Any]]) -> None:
    """Every rank's steps, running statistics and eval output against
    :func:`reference_run` on the concatenated batch."""
    reference = reference_run(case)
    for step, expected in enumerate(reference["steps"]):
        for key in ("y", "x_grad", "residual_grad") if case.residual else ("y", "x_grad"):
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


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_one_collective_in_forward_one_in_backward_none_in_eval(
        world_size: int, spawned: Callable[[int], list[dict[str, Any]]]) -> None:
    for rank, results in enumerate(spawned(world_size)):
        calls = results["collectives"]
        # the first forward also checks that the processes agree on channels and dtype
        assert calls["first_forward"] == ["all_gather", "all_gather"], rank
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


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_ghost_batches_are_per_process_and_need_no_collectives(
        world_size: int, spawned: Callable[[int], list[dict[str, Any]]]) -> None:
    for rank, results in enumerate(spawned(world_size)):
        synced, local = results["ghost"]["synced"], results["ghost"]["local"]
        assert synced["calls"] == [], rank
        for key in ("x_grad", "weight_grad", "running_var"):
            torch.testing.assert_close(synced[key], local[key], rtol=1e-12, atol=1e-12,
                                       msg=lambda m, k=key, r=rank: f"{k} on rank {r}: {m}")


def test_skipped_layer_on_another_rank_raises_naming_the_layer_within_the_timeout(
        tmp_path: Path) -> None:
    timeout_s, margin_s = 2.0, 5.0
    release = torch.multiprocessing.get_context("spawn").Event()
    result = run_processes(timeout_worker, 2, tmp_path, release, timeout_s=timeout_s,
                           bound_s=60.0)[0]
    assert "SyncBatchNorm 'block.bn'" in result["outcome"], result["outcome"]
    assert "forward all_gather" in result["outcome"]
    assert timeout_s * 0.9 <= result["elapsed"] <= timeout_s + margin_s, result["elapsed"]


def test_ranks_disagreeing_on_channels_or_dtype_raise_on_every_rank_naming_each_shape(
        tmp_path: Path) -> None:
    results = run_processes(mismatch_worker, 2, tmp_path, bound_s=60.0)
    for kind, shapes in (("channels", ("(3, 4, 2, 2) float32", "(4, 5, 2, 2) float32")),
                         ("dtype", ("(3, 4, 2, 2) float32", "(4, 4, 2, 2) float64"))):
        for rank, rank_results in enumerate(results):
            result = rank_results[kind]
            message = result["outcome"]
            assert "SyncBatchNorm 'block.bn'" in message, (kind, rank, message)
            assert f"rank 0: {shapes[0]}" in message and f"rank 1: {shapes[1]}" in message, \
                (kind, rank, message)
            assert result["running_var_unchanged"] and result["num_batches_tracked"] == 0


def test_rank_in_eval_while_another_trains_fails_after_the_layers_own_timeout(
        tmp_path: Path) -> None:
    timeout_s, margin_s = 2.0, 5.0
    release = torch.multiprocessing.get_context("spawn").Event()
    result = run_processes(mode_mismatch_worker, 2, tmp_path, release, timeout_s, bound_s=90.0,
                           timeout_s=60.0)[0]  # the process group would wait 60 s
    assert "SyncBatchNorm 'bn'" in result["outcome"], result["outcome"]
    assert "eval mode" in result["outcome"] and f"{timeout_s:g} s" in result["outcome"]
    assert timeout_s * 0.9 <= result["elapsed"] <= timeout_s + margin_s, result["elapsed"]
