"""End-to-end rows: training steps (forward, cross-entropy, backward, SGD step) of real
architectures built from ``torch.nn`` layers vs :func:`batchnorm.convert` of a copy of
the same model, eager and under torch.compile, contiguous (NCHW) and channels_last; eager
also with ``convert(fuse_activations=True)`` (the same model as the plain conversion when
no Sequential runs a BatchNorm into an activation).

The variants of one (model, layout) run in the same interleaved rounds, each as
:data:`COPIES` copies used in turn; the compiled ones are compiled and warmed up before the
first timed round."""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.bench import measure, models, report
from batchnorm.bench.report import ms


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # (batch, ...)
    num_classes: int

    @property
    def layouts(self) -> tuple[str, ...]:
        if len(self.input_shape) == 4:
            return ("contiguous", "channels_last")
        return ("contiguous",)


MODELS: tuple[ModelCase, ...] = (
    ModelCase("ResNet-18 (CIFAR)", models.resnet18_cifar, (32, 3, 32, 32), 10),
    ModelCase("MobileNetV2", models.mobilenet_v2, (16, 3, 64, 64), 200),
    ModelCase("TF tutorial MLP (7 layers, leaky ReLU)", models.tf_tutorial_mlp, (64, 784), 10),
    ModelCase("Hands-On ML MLP (300-100, ELU)", models.hands_on_ml_mlp, (200, 784), 10),
    ModelCase("GroupNorm/LayerNorm CNN", models.gn_ln_net, (32, 3, 32, 32), 10),
)

# The same architectures, narrowed and on small batches, for the smoke test (--tiny).
TINY_MODELS: tuple[ModelCase, ...] = (
    ModelCase("ResNet-18 (CIFAR)", partial(models.resnet18_cifar, width=8), (4, 3, 16, 16),
              10),
    ModelCase("MobileNetV2", partial(models.mobilenet_v2, num_classes=10, width_mult=0.25),
              (4, 3, 32, 32), 10),
    ModelCase("TF tutorial MLP (7 layers, leaky ReLU)", models.tf_tutorial_mlp, (8, 784), 10),
    ModelCase("Hands-On ML MLP (300-100, ELU)", models.hands_on_ml_mlp, (8, 784), 10),
    ModelCase("GroupNorm/LayerNorm CNN", partial(models.gn_ln_net, width=8), (4, 3, 16, 16),
              10),
)


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> measure.Step:
    """One SGD step (lr 1e-3, momentum 0.9) on a fixed batch; on a GPU, until it is done."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return loss
    return step


# Profiler names of the normalization operators and autograd nodes, torch.nn's and ours.
_NORM_KEYS = ("batch_norm", "layer_norm", "group_norm", "BatchNorm", "LayerNorm", "GroupNorm",
              "running_stats")


def _is_norm(event: Any) -> bool:
    return any(key in event.name for key in _NORM_KEYS)


def norm_time(step: measure.Step, calls: int = 2) -> tuple[float, float]:
    """``(normalization ms, step ms)`` per training step, from ``calls`` profiled steps after
    as many unprofiled ones: the wall time of the outermost normalization operators and
    autograd nodes (not the Python around them), and of the whole step. The step cannot
    get faster than ``step / (step - normalization)`` by its normalization layers alone."""
    for _ in range(calls):  # the first steps allocate the optimizer's state
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        elapsed_ms = (time.perf_counter() - start) * 1e3
    norm_us = 0.0
    for event in profile.events():
        parent = event.cpu_parent
        while parent is not None and not _is_norm(parent):
            parent = parent.cpu_parent
        if parent is None and _is_norm(event):
            norm_us += event.cpu_time_total
    return norm_us / 1e3 / calls, elapsed_ms / calls


def _norm_note(times: dict[str, tuple[float, float]] | None) -> str:
    if times is None:
        return ""
    (torch_norm, torch_step), (ours_norm, _) = times["torch"], times["ours"]
    return (f"normalization operators: torch.nn {ms(torch_norm)} ms "
            f"({torch_norm / torch_step:.1%} of its step, so at most "
            f"{torch_step / (torch_step - torch_norm):.2f}x by them), ours {ms(ours_norm)} ms")


COPIES = 3
"""Copies of each variant, used in turn, one per call: identical copies of one torch.nn
model, timed interleaved, differ by up to 5 % (their memory placement), which a ratio of
two single copies would take for a difference of the implementations."""


def _in_turn(steps: list[measure.Step]) -> measure.Step:
    """One step that runs the next of ``steps`` at each call."""
    calls = itertools.count()

    def step() -> object:
        return steps[next(calls) % len(steps)]()
    return step


def run(case: ModelCase, layout: str, compiler: measure.Compiler, rounds: int, warmup: int,
        min_round_s: float, limits: measure.Limits, device: str | torch.device = "cpu"
        ) -> list[dict[str, object]]:
    """The eager row and (compile enabled) the torch.compile row of one model and layout."""
    torch.manual_seed(0)
    reference = case.build()
    memory_format = torch.channels_last if layout == "channels_last" else \
        torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.input_shape, generator=generator).to(device).contiguous(
        memory_format=memory_format)
    target = torch.randint(case.num_classes, (case.input_shape[0],), generator=generator
                           ).to(device)

    def variant(implementation: str) -> nn.Module:
        model = copy.deepcopy(reference)
        if implementation != "torch":
            model = batchnorm.convert(model, fuse_activations=implementation == "fused")
        return model.to(device, memory_format=memory_format).train()

    def in_turn(models: list[nn.Module]) -> measure.Step:
        return _in_turn([training_step(model, x, target) for model in models])

    eager = {name: [variant(name) for _ in range(COPIES)] for name in ("torch", "ours", "fused")}
    steps = {f"eager {name}": in_turn(models) for name, models in eager.items()}
    # on a GPU the CPU's operator time is not the step's
    times = {name: norm_time(steps[f"eager {name}"], calls=COPIES) for name in ("torch", "ours")} \
        if torch.device(device).type == "cpu" else None
    fused = sum(bool(getattr(layer, "activation", None)) for layer in eager["fused"][0].modules())

    def compiled_step(implementation: str) -> measure.Step:
        step = in_turn([compiler.compile(variant(implementation.split()[0]))
                        for _ in range(COPIES)])
        if implementation == "torch" or implementation == "ours":
            return step

        def with_operators() -> object:  # dynamo keeps one graph per value of the switch
            batchnorm.functional.DECOMPOSE_UNDER_COMPILE = False
            try:
                return step()
            finally:
                batchnorm.functional.DECOMPOSE_UNDER_COMPILE = True
        return with_operators

    compiled, notes = compiler.warm_up({f"compile {name}": partial(compiled_step, name)
                                        for name in ("torch", "ours", "ours operators")},
                                       calls=2 * COPIES)
    steps.update(compiled)
    timed = measure.interleaved_rounds(steps, rounds, warmup, min_round_s)
    pairs = {"eager": ("eager torch", "eager ours"),
             "eager, fused activations": ("eager torch", "eager fused"),
             "compile": ("compile torch", "compile ours"),
             "compile, operators": ("compile torch", "compile ours operators")}
    return [{"model": case.name, "input_shape": list(case.input_shape), "layout": layout,
             "mode": mode, "load_1min": timed.load_1min, "cpu_wait": timed.cpu_wait,
             "torch_ms": timed.ms(torch_name), "ours_ms": timed.ms(ours_name),
             "speedup": timed.compare(torch_name, ours_name, limits),
             "rounds_ms": {"torch": timed.rounds_ms().get(torch_name),
                           "ours": timed.rounds_ms().get(ours_name)},
             "graphs_compiled_while_timing": timed.graphs_compiled,
             "norm_ms": None if times is None else
             {name: times[name][0] for name in ("torch", "ours")},
             "note": _norm_note(times) if mode == "eager" else f"{fused} activation(s) fused"
             if mode.startswith("eager") else
             f"torch.nn {notes['compile torch']}; converted {notes[ours_name]}"}
            for mode, (torch_name, ours_name) in pairs.items()
            if compiler.enabled or mode.startswith("eager")]


def run_all(cases: list[ModelCase], compiler: measure.Compiler, rounds: int, warmup: int,
            min_round_s: float, limits: measure.Limits, device: str | torch.device = "cpu"
            ) -> list[dict[str, object]]:
    """:func:`run` for every case in each of its layouts, printing each row as it comes."""
    rows = []
    for case in cases:
        for layout in case.layouts:
            for row in run(case, layout, compiler, rounds, warmup, min_round_s, limits,
                           device):
                rows.append(row)
                print(f"{case.name} {layout} {row['mode']}: torch.nn "
                      f"{report.ms(row['torch_ms'])} ms, converted "
                      f"{report.ms(row['ours_ms'])} ms", flush=True)
    return rows
