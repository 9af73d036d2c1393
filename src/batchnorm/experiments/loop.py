"""The one training loop every experiment shares.

An experiment describes its training as a list of :class:`Run` (model builder, optimizer,
the training images, batch plan, metrics); :func:`train_runs` trains them in order,
records the metrics every ``steps_per_record`` updates and writes a checkpoint after each
record, so an interrupted experiment resumes where it stopped and ends with the same
numbers as an uninterrupted one. A checkpoint that does not fit the runs is an error
naming the file, never a silent start from wrong state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from batchnorm.errors import FileContentError
from batchnorm.experiments.atomic import write_atomic

Metric = Callable[[nn.Module], float | list[float]]
History = dict[str, list[float | list[float]]]
# Called after each checkpoint with (run name, records done); tests interrupt through it.
RecordHook = Callable[[str, int], None]
RESTART_HINT = "start over with --restart (or delete the file)"
_STATE_KEYS = {"key", "done", "current"}
_CURRENT_KEYS = {"name", "model", "optimizer", "sampler", "history"}


class CheckpointError(FileContentError):
    """An experiment checkpoint that cannot be resumed from: unreadable, not a
    checkpoint, or holding state that does not fit the runs it claims to be for."""

    def __init__(self, path: Path, problem: str, expected: object, actual: object) -> None:
        super().__init__(path, problem, expected, actual, hint=RESTART_HINT)


@dataclass(frozen=True)
class Run:
    """One training run: what to build, how to train it, and what to record.

    ``build`` runs under ``torch.manual_seed(seed)``, so default initializations are
    reproducible; the batches are drawn from ``(train_x, train_y)`` by a generator seeded
    with ``seed`` too, so two runs with the same seed and data (e.g. BN and no BN at one
    weight scale) see the same batches."""

    name: str
    seed: int
    build: Callable[[], nn.Module]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    train_x: Tensor = field(repr=False)  # exactly the images this run trains on
    train_y: Tensor = field(repr=False)
    batch_size: int
    records: int
    steps_per_record: int
    metrics: Mapping[str, Metric]
    replacement: bool = False  # each batch drawn with replacement instead of epoch shuffles

    @property
    def steps(self) -> int:
        return self.records * self.steps_per_record


def run_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 62-bit seeds derived from one experiment seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2**62, (count,), generator=generator).tolist()


class BatchSampler:
    """Index batches from a seeded generator: reshuffled epochs (dropping the last partial
    batch) or draws with replacement. Its state dict lets a resumed run continue the same
    sequence of batches."""

    def __init__(self, size: int, batch_size: int, seed: int, replacement: bool) -> None:
        if batch_size < 1 or (batch_size > size and not replacement):
            raise ValueError(f"batch_size must be in [1, {size}] (the training set size) "
                             f"unless drawn with replacement, got {batch_size}")
        self.size, self.batch_size, self.replacement = size, batch_size, replacement
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next(self) -> Tensor:
        if self.replacement:
            return torch.randint(self.size, (self.batch_size,), generator=self.generator)
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        order, position = state["order"], state["position"]
        if not (isinstance(order, Tensor) and order.dtype == torch.long and order.dim() == 1
                and len(order) in (0, self.size)
                and torch.equal(order.sort().values, torch.arange(len(order)))):
            raise ValueError(f"order must be empty or a permutation of range({self.size}), "
                             f"got {order!r}")
        if not (isinstance(position, int) and 0 <= position <= len(order)):
            raise ValueError(f"position must be an int in [0, {len(order)}], got {position!r}")
        self.generator.set_state(state["generator"])
        self.order, self.position = order, position


@contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (running statistics, counters) on exit."""
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool = False,
             batch_size: int = 1000) -> float | list[float]:
    """Fraction of ``x`` classified as ``y`` (one per model for stacked models).
    ``train_mode`` normalizes each batch with its own statistics (what the network sees
    while training) and leaves the running statistics untouched."""
    was_training = model.training
    model.train(train_mode)
    correct = torch.zeros((), dtype=torch.long)
    try:
        with kept_buffers(model):
            for start in range(0, len(x), batch_size):
                predicted = model(x[start:start + batch_size]).argmax(-1)
                labels = y[start:start + batch_size].view(-1, *[1] * (predicted.dim() - 1))
                correct = correct + (predicted == labels).sum(0)
    finally:
        model.train(was_training)
    return (correct.double() / len(x)).tolist()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy; for stacked models' ``(B, M, classes)`` logits the sum over
    models of each one's mean, so each model gets exactly the gradient it would alone."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, logits.shape[1]),
                               reduction="sum") / len(y)
    return F.cross_entropy(logits, y)


def _save(state: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda handle: torch.save(state, handle))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _check_history(path: Path, run: Run, history: object, finished: bool) -> None:
    """A run's history: one list per metric, all ``run.records`` long when finished and
    between 1 and ``run.records - 1`` records long when not."""
    what = f"metric histories of run {run.name!r}"
    if not isinstance(history, dict) or set(history) != set(run.metrics):
        raise CheckpointError(path, what, f"lists for the metrics {sorted(run.metrics)}",
                              sorted(history) if isinstance(history, dict)
                              else type(history).__name__)
    lengths = sorted({len(values) if isinstance(values, list) else -1
                      for values in history.values()})
    expected = [run.records] if finished else list(range(1, run.records))
    if len(lengths) != 1 or lengths[0] not in expected:
        raise CheckpointError(path, f"number of records in the {what}",
                              run.records if finished else f"1 to {run.records - 1}",
                              ", ".join("not a list" if n < 0 else str(n) for n in lengths))

    def numeric(value: object) -> bool:
        if isinstance(value, list):
            return all(numeric(item) for item in value)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not all(numeric(value) for values in history.values() for value in values):
        raise CheckpointError(path, what, "numbers (or lists of numbers)", "other values")


def _check_state(path: Path, state: dict[str, Any], runs: list[Run]) -> None:
    by_name = {run.name: run for run in runs}
    done, current = state["done"], state["current"]
    if not isinstance(done, dict) or not set(done) <= set(by_name):
        raise CheckpointError(path, "finished runs", f"a dict of runs among {sorted(by_name)}",
                              sorted(done) if isinstance(done, dict) else type(done).__name__)
    for name, history in done.items():
        _check_history(path, by_name[name], history, finished=True)
    if current is None:
        return
    if not isinstance(current, dict) or set(current) != _CURRENT_KEYS:
        raise CheckpointError(path, "the run in progress", f"a dict with {sorted(_CURRENT_KEYS)}",
                              sorted(current) if isinstance(current, dict)
                              else type(current).__name__)
    if current["name"] not in set(by_name) - set(done):
        raise CheckpointError(path, "the run in progress",
                              f"one of the unfinished runs {sorted(set(by_name) - set(done))}",
                              repr(current["name"]))
    _check_history(path, by_name[current["name"]], current["history"], finished=False)


def _load_checkpoint(path: Path, key: str, runs: list[Run]) -> dict[str, Any]:
    """The saved state when it belongs to this exact experiment configuration, checked
    against ``runs``; a fresh state when there is none or it is another configuration's."""
    fresh = {"key": key, "done": {}, "current": None}
    if not path.exists():
        return fresh
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # truncated, empty, not a torch file: all unreadable
        raise CheckpointError(path, "unreadable checkpoint", "a file written by torch.save",
                              _first_line(error)) from None
    if not isinstance(state, dict) or set(state) != _STATE_KEYS:
        raise CheckpointError(path, "not an experiment checkpoint",
                              f"a dict with {sorted(_STATE_KEYS)}",
                              sorted(map(str, state)) if isinstance(state, dict)
                              else type(state).__name__)
    if state["key"] != key:
        tqdm.write(f"{path}: saved for another configuration; starting over")
        return fresh
    _check_state(path, state, runs)
    return state


def train_runs(runs: list[Run], checkpoint: Path, key: Mapping[str, Any], *,
               progress: bool = True, desc: str = "", on_record: RecordHook | None = None
               ) -> dict[str, History]:
    """Train ``runs``, each on its own ``train_x``/``train_y``, with :func:`cross_entropy`
    and return each run's metric histories; resumes from ``checkpoint`` when it was written
    for the same ``key`` (experiment, configuration, seed, data) and raises
    :class:`CheckpointError` when that checkpoint does not fit ``runs``."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    state = _load_checkpoint(checkpoint, json.dumps(key, sort_keys=True), runs)
    finished = [name for name in names if name in state["done"]]
    if finished:
        tqdm.write(f"{checkpoint}: reused the results of {len(finished)} of {len(runs)} "
                   f"finished runs" + (" (nothing left to train)"
                                       if len(finished) == len(runs) else ""))
    if state["current"] is not None:
        current = state["current"]
        done = len(next(iter(current["history"].values())))
        tqdm.write(f"{checkpoint}: resuming run {current['name']!r} after record {done}")
    with tqdm(total=sum(run.steps for run in runs), desc=desc, unit="step",
              disable=not progress, dynamic_ncols=True) as bar:
        for run in runs:
            if run.name not in state["done"]:
                bar.set_postfix_str(run.name)
                _train(run, state, checkpoint, bar, on_record)
            else:
                bar.update(run.steps)
    return {run.name: state["done"][run.name] for run in runs}


def _train(run: Run, state: dict[str, Any], checkpoint: Path, bar: tqdm,
           on_record: RecordHook | None) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = run.build()
    optimizer = run.optimizer(list(model.parameters()))
    train_x, train_y = run.train_x, run.train_y
    sampler = BatchSampler(len(train_x), run.batch_size, run.seed, run.replacement)
    history: History = {name: [] for name in run.metrics}
    current = state["current"]
    if current is not None and current["name"] == run.name:
        try:
            model.load_state_dict(current["model"])
            optimizer.load_state_dict(current["optimizer"])
            sampler.load_state_dict(current["sampler"])
        except Exception as error:  # any mismatch of the saved state with this run
            raise CheckpointError(checkpoint, f"saved state of run {run.name!r}",
                                  "the model, optimizer and batch order this configuration "
                                  "builds", _first_line(error)) from None
        history = current["history"]
    done = len(next(iter(history.values()), []))
    bar.update(done * run.steps_per_record)
    for record in range(done, run.records):
        model.train()
        for _ in range(run.steps_per_record):
            batch = sampler.next()
            loss = cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        bar.update(run.steps_per_record)
        for name, metric in run.metrics.items():
            history[name].append(metric(model))
        state["current"] = {"name": run.name, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "sampler": sampler.state_dict(), "history": history}
        if record + 1 == run.records:
            state["done"][run.name], state["current"] = history, None
        _save(state, checkpoint)
        if on_record is not None:
            on_record(run.name, record + 1)
