"""The one training loop every experiment shares.

An experiment describes its training as a list of :class:`Run` (model builder, optimizer,
batch plan, metrics); :func:`train_runs` trains them in order, records the metrics every
``steps_per_record`` updates and writes a checkpoint after each record, so an interrupted
experiment resumes where it stopped and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

Metric = Callable[[nn.Module], float | list[float]]
History = dict[str, list[float | list[float]]]
# Called after each checkpoint with (run name, records done); tests interrupt through it.
RecordHook = Callable[[str, int], None]


@dataclass(frozen=True)
class Run:
    """One training run: what to build, how to train it, and what to record.

    ``build`` runs under ``torch.manual_seed(seed)``, so default initializations are
    reproducible; the batches come from a generator seeded with ``seed`` too, so two runs
    with the same seed (e.g. BN and no BN at one weight scale) see the same batches."""

    name: str
    seed: int
    build: Callable[[], nn.Module]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
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
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


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


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _load_checkpoint(path: Path, key: str) -> dict[str, Any]:
    """The saved state when it belongs to this exact experiment configuration."""
    if path.exists():
        state = torch.load(path, weights_only=True)
        if state.get("key") == key:
            return state
        tqdm.write(f"{path}: saved for another configuration; starting over")
    return {"key": key, "done": {}, "current": None}


def train_runs(runs: list[Run], train_x: Tensor, train_y: Tensor, checkpoint: Path,
               key: Mapping[str, Any], *, progress: bool = True, desc: str = "",
               on_record: RecordHook | None = None) -> dict[str, History]:
    """Train ``runs`` on ``(train_x, train_y)`` with :func:`cross_entropy` and return each run's
    metric histories; resumes from ``checkpoint`` when it was written for the same
    ``key`` (experiment, configuration, seed, data)."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    state = _load_checkpoint(checkpoint, json.dumps(key, sort_keys=True))
    with tqdm(total=sum(run.steps for run in runs), desc=desc, unit="step",
              disable=not progress, dynamic_ncols=True) as bar:
        for run in runs:
            if run.name not in state["done"]:
                bar.set_postfix_str(run.name)
                _train(run, train_x, train_y, state, checkpoint, bar, on_record)
            else:
                bar.update(run.steps)
    return {run.name: state["done"][run.name] for run in runs}


def _train(run: Run, train_x: Tensor, train_y: Tensor, state: dict[str, Any], checkpoint: Path,
           bar: tqdm, on_record: RecordHook | None) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = run.build()
    optimizer = run.optimizer(list(model.parameters()))
    sampler = BatchSampler(len(train_x), run.batch_size, run.seed, run.replacement)
    history: History = {name: [] for name in run.metrics}
    current = state["current"]
    if current is not None and current["name"] == run.name:
        model.load_state_dict(current["model"])
        optimizer.load_state_dict(current["optimizer"])
        sampler.load_state_dict(current["sampler"])
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
        _save_atomic(state, checkpoint)
        if on_record is not None:
            on_record(run.name, record + 1)
