"""recalibrate: running statistics become the exact population statistics (float64, 1e-10)
of every value each BatchNorm saw, whatever the batch sizes; nothing else changes."""

from __future__ import annotations

import copy
import itertools
import math
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from recalibrate_workers import recalibrate_shard
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import recalibrate

EXACT = {"atol": 1e-10, "rtol": 1e-10}


def population(values: list[torch.Tensor], axis: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: mean and unbiased variance per channel of all values concatenated."""
    flat = torch.cat([v.movedim(axis, -1).reshape(-1, v.shape[axis]) for v in values])
    return flat.mean(0), flat.var(0, correction=1)


def uneven_batches(shape_tail: tuple[int, ...], sizes=(5, 17, 2, 30, 9)) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(size, *shape_tail, dtype=torch.float64) * 3 + 1 for size in sizes]


def model_with_every_flavour() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), batchnorm.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 6), batchnorm.BatchNorm1d(6), nn.Unflatten(1, (2, 3)),
        batchnorm.BatchNorm(3, axis=-1),
    ).double()


def capture_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list]:
    """Every BatchNorm's input on each batch in training mode, on a copy of the model."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.register_forward_pre_hook(
                lambda _, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return seen


def test_single_layer_stats_equal_the_population_of_the_data():
    conv, bn = nn.Conv2d(3, 4, 3).double(), nn.BatchNorm2d(4).double()
    batches = uneven_batches((3, 8, 8))
    recalibrate(nn.Sequential(conv, bn), batches)
    with torch.no_grad():
        mean, var = population([conv(torch.cat(batches))])
    torch.testing.assert_close(bn.running_mean, mean, **EXACT)
    torch.testing.assert_close(bn.running_var, var, **EXACT)


def test_every_batchnorm_flavour_gets_the_population_of_its_training_mode_inputs():
    model = model_with_every_flavour()
    batches = uneven_batches((3, 8, 8))
    inputs = capture_inputs(model, batches)
    recalibrate(model, [(batch, torch.zeros(len(batch))) for batch in batches])
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert len(layers) == 4
    for name, bn in layers.items():
        mean, var = population(inputs[name], getattr(bn, "axis", 1))
        torch.testing.assert_close(bn.running_mean, mean, **EXACT)
        torch.testing.assert_close(bn.running_var, var, **EXACT)


def test_count_weighting_differs_from_averaging_per_batch_statistics():
    """Guards the estimator: equal per-batch weights (torch's update_bn) would differ."""
    bn = nn.BatchNorm1d(2).double()
    batches = [torch.full((2, 2), 0.0, dtype=torch.float64) + torch.tensor([[0.0], [1.0]]),
               torch.full((20, 2), 5.0, dtype=torch.float64) + torch.arange(20.0)[:, None]]
    recalibrate(bn, batches)
    mean, var = population(batches)
    torch.testing.assert_close(bn.running_mean, mean, **EXACT)
    torch.testing.assert_close(bn.running_var, var, **EXACT)
    assert not math.isclose(bn.running_mean[0].item(), (0.5 + 14.5) / 2)


def test_parameters_mode_and_momentum_are_restored():
    model = model_with_every_flavour().eval()
    model[4].train()
    params = {name: p.clone() for name, p in model.named_parameters()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)]
    returned = recalibrate(model, uneven_batches((3, 8, 8)), num_batches=3)
    assert returned is model
    assert [m.training for m in model.modules()] == \
        [name == "4" for name, _ in model.named_modules()]
    assert [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)] == momenta
    assert momenta == [0.1, None, 0.1, 0.1]
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
        assert param.grad is None


def test_only_the_first_num_batches_are_consumed():
    bn = nn.BatchNorm1d(3).double()
    stream = (torch.randn(4, 3, dtype=torch.float64) + step for step in itertools.count())
    taken = []
    recalibrate(bn, (taken.append(batch) or batch for batch in stream), num_batches=5)
    assert len(taken) == 5
    mean, var = population(taken)
    torch.testing.assert_close(bn.running_mean, mean, **EXACT)
    torch.testing.assert_close(bn.running_var, var, **EXACT)
    assert int(bn.num_batches_tracked) == 5


def test_dataloader_batches_are_accepted():
    data = torch.randn(50, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data, torch.zeros(50)), batch_size=16)
    bn = batchnorm.BatchNorm1d(3).double()
    recalibrate(bn, loader)
    torch.testing.assert_close(bn.running_mean, data.mean(0), **EXACT)
    torch.testing.assert_close(bn.running_var, data.var(0), **EXACT)


def test_bad_arguments_raise_clear_errors():
    bn = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="num_batches must be a positive int, got 0"):
        recalibrate(bn, [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recalibrate(bn, [])
    with pytest.raises(TypeError, match=r"must be a tensor or an \(input, target\) tuple, got str"):
        recalibrate(bn, ["x"])
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        recalibrate([bn], [torch.randn(4, 3)])
    assert bn.momentum == 0.1 and bn.training


def test_model_without_batchnorm_warns_and_is_returned():
    model = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="no BatchNorm with running statistics"):
        assert recalibrate(model, [torch.randn(4, 3)]) is model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_statistics_are_merged_across_processes(tmp_path):
    data = torch.randn(41, 3, dtype=torch.float64) * 2 + torch.arange(41.0)[:, None] / 10
    context = mp.start_processes(recalibrate_shard, args=(2, _free_port(), data, tmp_path),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120  # a hung collective must fail, not hang the suite
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("recalibrate across 2 processes did not finish in 120 s")
    for rank in (0, 1):
        running_mean, running_var = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(running_mean, data.mean(0), **EXACT)
        torch.testing.assert_close(running_var, data.var(0), **EXACT)


def test_recalibration_closes_the_eval_gap_of_momentum_one_on_digits():
    """BN momentum does not change training, only the running statistics: with momentum 1
    they are the last batch's, and eval accuracy drops; recalibrated, the two models have
    identical statistics and accuracy again (scikit-learn digits, batches of 8)."""
    from batchnorm.data import load_split

    data = load_split("digits")

    def train(momentum: float) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32, bias=False),
            batchnorm.BatchNorm1d(32, momentum=momentum),
            nn.ReLU(), nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, momentum=momentum),
            nn.ReLU(), nn.Linear(32, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        generator = torch.Generator().manual_seed(1)
        for _ in range(300):
            index = torch.randint(len(data.train_x), (8,), generator=generator)
            loss = nn.functional.cross_entropy(model(data.train_x[index]), data.train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.eval()

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(data.val_x).argmax(1) == data.val_y).double().mean().item()

    def training_batches():
        generator = torch.Generator().manual_seed(2)
        while True:
            yield data.train_x[torch.randint(len(data.train_x), (8,), generator=generator)]

    healthy, too_high = train(0.1), train(1.0)
    before = accuracy(too_high)
    assert before < accuracy(healthy) - 0.1  # the gap: over 10 points on this seed
    for model in (healthy, too_high):
        recalibrate(model, training_batches(), num_batches=100)
    for recalibrated, reference in zip(too_high.buffers(), healthy.buffers(), strict=True):
        assert torch.equal(recalibrated, reference)
    assert accuracy(too_high) == accuracy(healthy) > before + 0.1


def test_lazy_batchnorm_is_initialized_by_the_first_batch_and_recalibrated():
    model = nn.Sequential(nn.Linear(4, 3), batchnorm.LazyBatchNorm1d()).double()
    batches = uneven_batches((4,), sizes=(6, 11))
    recalibrate(model, batches)
    with torch.no_grad():
        mean, var = population([model[0](torch.cat(batches))])
    assert isinstance(model[1], batchnorm.BatchNorm1d)
    torch.testing.assert_close(model[1].running_mean, mean, **EXACT)
    torch.testing.assert_close(model[1].running_var, var, **EXACT)
