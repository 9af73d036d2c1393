"""The shared training loop: batches, metrics, the stacked-model loss, checkpoints."""

from __future__ import annotations

import copy
import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.experiments.loop import (
    BatchSampler,
    CheckpointError,
    Run,
    accuracy,
    cross_entropy,
    run_seeds,
    train_runs,
)
from batchnorm.experiments.models import mlp, stacked_mlp


def test_epoch_batches_cover_every_index_once_then_reshuffle():
    sampler = BatchSampler(10, 3, seed=0, replacement=False)
    first = torch.cat([sampler.next() for _ in range(3)])
    second = torch.cat([sampler.next() for _ in range(3)])
    assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9
    assert not torch.equal(first, second)


def test_batches_with_replacement_have_the_batch_size_and_stay_in_range():
    sampler = BatchSampler(5, 100, seed=0, replacement=True)
    batch = sampler.next()
    assert batch.shape == (100,) and batch.min() >= 0 and batch.max() < 5
    assert len(set(batch.tolist())) < 100  # repeats: drawn with replacement


@pytest.mark.parametrize("replacement", [False, True])
def test_restored_sampler_continues_the_same_batches(replacement):
    sampler = BatchSampler(10, 4, seed=3, replacement=replacement)
    sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(4)]
    resumed = BatchSampler(10, 4, seed=99, replacement=replacement)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next() for _ in range(4)],
                                                  strict=True))


def test_batch_larger_than_the_training_set_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\].*got 11"):
        BatchSampler(10, 11, seed=0, replacement=False)


def test_run_seeds_are_distinct_and_reproducible():
    assert run_seeds(0, 4) == run_seeds(0, 4)
    assert len(set(run_seeds(0, 4))) == 4 and run_seeds(0, 4) != run_seeds(1, 4)


def test_train_mode_accuracy_leaves_running_statistics_untouched():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), batchnorm.BatchNorm1d(3))
    x, y = torch.randn(20, 4) * 5 + 2, torch.randint(3, (20,))
    before = {name: b.clone() for name, b in model.named_buffers()}
    value = accuracy(model, x, y, train_mode=True, batch_size=5)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())
    with torch.no_grad():
        expected = sum(int((model.train()(x[i:i + 5]).argmax(1) == y[i:i + 5]).sum())
                       for i in range(0, 20, 5)) / 20
    assert value == expected


def test_accuracy_is_the_exact_fraction_and_restores_the_training_mode():
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(model, x, torch.tensor([0, 1, 1, 1]), batch_size=3) == 0.75
    assert model.training


def test_stacked_loss_is_the_sum_of_each_models_mean_loss():
    logits, y = torch.randn(6, 3, 10, dtype=torch.float64), torch.randint(10, (6,))
    expected = sum(F.cross_entropy(logits[:, m], y) for m in range(3))
    torch.testing.assert_close(cross_entropy(logits, y), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("with_norm", [True, False])
def test_stacked_models_match_separate_models_in_outputs_gradients_and_statistics(with_norm):
    """Models trained side by side see exactly what each would alone: same outputs,
    gradients and running statistics (float64, tolerance 1e-10)."""
    torch.manual_seed(0)
    sizes, scales = [12, 8, 8, 5], [1.0, 0.1, 0.01]
    norm = batchnorm.BatchNorm1d if with_norm else None
    stacked = stacked_mlp(sizes, "relu", scales, norm=norm).double()
    x, y = torch.rand(16, 1, 3, 4, dtype=torch.float64), torch.randint(5, (16,))
    logits = stacked(x)
    cross_entropy(logits, y).backward()
    linears = [m for m in stacked if hasattr(m, "weight") and m.weight.dim() == 3]
    norms = [m.layer for m in stacked if hasattr(m, "layer")]
    for index in range(len(scales)):
        single = mlp(sizes, "relu", norm=norm).double()
        single_linears = [m for m in single if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for mine, theirs in zip(single_linears, linears, strict=True):
                mine.weight.copy_(theirs.weight[index].T)
                mine.bias.copy_(theirs.bias[index])
        out = single(x)
        F.cross_entropy(out, y).backward()
        torch.testing.assert_close(out, logits[:, index], rtol=1e-10, atol=1e-10)
        for mine, theirs in zip(single_linears, linears, strict=True):
            torch.testing.assert_close(mine.weight.grad, theirs.weight.grad[index].T,
                                       rtol=1e-10, atol=1e-10)
        single_norms = [m for m in single if isinstance(m, batchnorm.BatchNorm1d)]
        for mine, theirs in zip(single_norms, norms, strict=True):
            width = mine.num_features
            torch.testing.assert_close(
                mine.running_var, theirs.running_var[index * width:(index + 1) * width],
                rtol=1e-10, atol=1e-10)


def test_stacked_weights_have_each_models_scale():
    torch.manual_seed(0)
    model = stacked_mlp([400, 300, 10], "relu", [1.0, 0.01])
    std = model[1].weight.std(dim=(1, 2))
    torch.testing.assert_close(std, torch.tensor([1.0, 0.01]), rtol=0.02, atol=0)


_GENERATOR = torch.Generator().manual_seed(0)
_DATA = (torch.rand(40, 6, generator=_GENERATOR), torch.randint(3, (40,), generator=_GENERATOR))


def _runs(records: int = 4) -> list[Run]:
    metric = partial(accuracy, x=_DATA[0], y=_DATA[1])
    return [Run(name=name, seed=seed,
                build=partial(mlp, [6, 8, 3], "relu", norm=batchnorm.BatchNorm1d),
                optimizer=partial(torch.optim.Adam, lr=0.01), train_x=_DATA[0],
                train_y=_DATA[1], batch_size=8, records=records,
                steps_per_record=3, metrics={"acc": metric})
            for name, seed in (("a", 1), ("b", 2))]


class Interrupted(Exception):
    pass


def _interrupt_after(total: int):
    counter = itertools.count(1)

    def hook(name: str, records: int) -> None:
        if next(counter) == total:
            raise Interrupted

    return hook


def test_training_resumed_after_an_interruption_records_the_same_histories(tmp_path):
    key = {"experiment": "t"}
    expected = train_runs(_runs(), tmp_path / "a.pt", key, progress=False)
    # 4 records per run: stop inside the first run, and after the second's first record
    for stop, resumes_at in ((2, ("a", 3)), (5, ("b", 2))):
        path = tmp_path / f"resumed{stop}.pt"
        with pytest.raises(Interrupted):
            train_runs(_runs(), path, key, progress=False,
                       on_record=_interrupt_after(stop))
        calls: list[tuple[str, int]] = []
        resumed = train_runs(_runs(), path, key, progress=False,
                             on_record=lambda *call, calls=calls: calls.append(call))
        assert calls[0] == resumes_at
        assert resumed == expected


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(Interrupted):
        train_runs(_runs(), path, {"seed": 1}, progress=False,
                   on_record=_interrupt_after(2))
    calls = []
    train_runs(_runs(), path, {"seed": 2}, progress=False,
               on_record=lambda *call: calls.append(call))
    assert calls[0] == ("a", 1)  # started over


def test_duplicate_run_names_are_an_error(tmp_path):
    runs = _runs()
    with pytest.raises(ValueError, match="run names must be unique"):
        train_runs([runs[0], runs[0]], tmp_path / "d.pt", {}, progress=False)


def _interrupted_checkpoint(path) -> dict:
    """A checkpoint left after run "a" finished and "b" recorded once, as saved."""
    with pytest.raises(Interrupted):
        train_runs(_runs(), path, {"seed": 0}, progress=False, on_record=_interrupt_after(5))
    return torch.load(path, weights_only=True)


def _forged(state: dict, change) -> dict:
    state = copy.deepcopy(state)
    change(state)
    return state


@pytest.mark.parametrize("damage, problem", [
    (lambda path, state: path.write_bytes(path.read_bytes()[:200]), "unreadable checkpoint"),
    (lambda path, state: path.write_bytes(b""), "unreadable checkpoint"),
    (lambda path, state: torch.save([1, 2, 3], path),
     "not an experiment checkpoint: expected a dict with ['current', 'done', 'key'], got list"),
    (lambda path, state: torch.save(_forged(state, lambda s: s["done"]["a"]["acc"].append(1.0)),
                                    path),
     "number of records in the metric histories of run 'a': expected 4, got 5"),
    (lambda path, state: torch.save(
        _forged(state, lambda s: s["current"]["history"]["acc"].extend([1.0] * 5)), path),
     "number of records in the metric histories of run 'b': expected 1 to 3, got 6"),
    (lambda path, state: torch.save(_forged(state, lambda s: s["done"].update(z={})), path),
     "finished runs: expected a dict of runs among ['a', 'b'], got ['a', 'z']"),
    (lambda path, state: torch.save(
        _forged(state, lambda s: s["current"]["sampler"].update(position=10**6)), path),
     "saved state of run 'b'"),
    (lambda path, state: torch.save(
        _forged(state, lambda s: s["current"]["model"].pop("1.weight")), path),
     "saved state of run 'b'"),
])
def test_a_damaged_checkpoint_is_an_error_naming_the_file_and_how_to_start_over(
        damage, problem, tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _interrupted_checkpoint(path)
    damage(path, state)
    with pytest.raises(CheckpointError) as caught:
        train_runs(_runs(), path, {"seed": 0}, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{path}: {problem}")
    assert message.endswith("start over with --restart (or delete the file)")


def test_the_checkpoint_is_replaced_atomically_never_written_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    path.with_name("checkpoint.pt.tmp").symlink_to(target)  # the old fixed temporary name
    train_runs(_runs(records=1), path, {}, progress=False)
    assert target.read_text() == "precious"
    assert torch.load(path, weights_only=True)["done"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt", "checkpoint.pt.tmp"]
