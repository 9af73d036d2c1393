"""Find the BatchNorm mistakes people actually make, before they cost a training run.

Each check returns :class:`Finding` objects with a stable ``code``. Checks that need data
(the train/eval gap, values per channel) run only when a ``batch`` is given; the weight
decay check only when the ``optimizer`` is given.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from batchnorm.tools.graph import layer_batchnorm_pairs, sequential_pairs, trace

__all__ = ["FEW_VALUES_PER_CHANNEL", "GAP_MEAN_SHIFT", "GAP_VAR_RATIO", "Finding", "doctor"]

Severity = Literal["error", "warning", "info"]

# Fewer values per channel than this in a training batch make the batch statistics too
# noisy to normalize with (and the running statistics a poor population estimate).
FEW_VALUES_PER_CHANNEL = 16
# Train/eval gap: the batch mean is more than this many running standard deviations from
# the running mean (root mean square over channels) ...
GAP_MEAN_SHIFT = 0.5
# ... or the batch variance differs from the running variance by more than this factor
# (geometric root mean square over channels).
GAP_VAR_RATIO = 2.0


@dataclass(frozen=True)
class Finding:
    """One problem: ``code`` is stable (match on it), ``layer`` the module's qualified
    name (``""`` for the model itself)."""

    code: str
    severity: Severity
    layer: str
    message: str
    fix: str


def _batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)}


def _affine_at_init(bn: _BatchNorm) -> bool:
    return all(param is None or bool((param == value).all())
               for param, value in ((bn.weight, 1), (bn.bias, 0)))


def _check_stats_never_updated(layers: dict[str, _BatchNorm]) -> list[Finding]:
    findings = []
    for name, bn in layers.items():
        if bn.running_mean is None or bn.running_var is None:
            continue
        tracked = bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0
        at_init = bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())
        if tracked or not at_init:
            continue
        trained = not _affine_at_init(bn)
        findings.append(Finding(
            "stats-never-updated", "error" if trained else "warning", name,
            "running statistics are still at their initial values (mean 0, variance 1; "
            "num_batches_tracked 0)" + (" although the affine parameters were trained"
                                        if trained else ""),
            "run the model in train() mode over training data (batchnorm.recalibrate does "
            "exactly this) or load the running_mean/running_var buffers with the weights"))
    return findings


def _check_train_mode(model: nn.Module, layers: dict[str, _BatchNorm]) -> list[Finding]:
    if model.training:
        return []
    return [Finding("bn-in-train-mode", "error", name,
                    "the model is in eval mode but this BatchNorm is in training mode: it "
                    "normalizes with batch statistics and keeps updating its running ones",
                    "call model.eval() after any code that switches submodules back to train()")
            for name, bn in layers.items() if bn.training]


def _check_frozen_params(layers: dict[str, _BatchNorm]) -> list[Finding]:
    findings = []
    for name, bn in layers.items():
        frozen = [param for param in ("weight", "bias")
                  if getattr(bn, param) is not None and not getattr(bn, param).requires_grad]
        if frozen and bn.training and bn.track_running_stats and bn.momentum != 0:
            findings.append(Finding(
                "frozen-params-updating-stats", "warning", name,
                f"{' and '.join(frozen)} have requires_grad=False, but the layer is in "
                "training mode and still updates its running statistics",
                "replace the layer by FrozenBatchNorm (batchnorm.freeze) or keep it in "
                "eval() mode during training, so its statistics stay frozen too"))
    return findings


def _check_half_stats(layers: dict[str, _BatchNorm]) -> list[Finding]:
    return [Finding("half-running-stats", "warning", name,
                    f"running statistics are stored in {bn.running_mean.dtype}: the "
                    "momentum update loses most of each step in half precision",
                    "keep BatchNorm in float32 (use torch.autocast instead of model.half())")
            for name, bn in layers.items()
            if bn.running_mean is not None
            and bn.running_mean.dtype in (torch.float16, torch.bfloat16)]


def _layer_bn_names(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) names where the layer's output feeds only the BatchNorm."""
    try:
        return [(pair.layer_name, pair.bn_name)
                for pair in layer_batchnorm_pairs(trace(model)) if pair.exclusive]
    except Exception:  # untraceable Python: fall back to nn.Sequential neighbours
        return sequential_pairs(model)


def _check_redundant_bias(model: nn.Module) -> list[Finding]:
    """A FrozenBatchNorm subtracts a fixed mean, so only a _BatchNorm cancels a bias."""
    findings = []
    for layer_name, bn_name in _layer_bn_names(model):
        if model.get_submodule(layer_name).bias is not None and \
                isinstance(model.get_submodule(bn_name), _BatchNorm):
            findings.append(Finding(
                "redundant-bias", "info", layer_name,
                f"this layer's bias feeds BatchNorm {bn_name!r}, which subtracts the mean "
                "and so cancels it: a wasted parameter",
                "construct the layer with bias=False (the BatchNorm's own bias replaces it)"))
    return findings


def _check_weight_decay(layers: dict[str, _BatchNorm],
                        optimizer: torch.optim.Optimizer) -> list[Finding]:
    owner = {id(param): name for name, bn in layers.items()
             for param in bn.parameters(recurse=False)}
    decayed: dict[str, float] = {}
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) > 0:
            for param in group["params"]:
                if id(param) in owner:
                    decayed.setdefault(owner[id(param)], group["weight_decay"])
    return [Finding("weight-decay-on-bn", "warning", name,
                    f"the optimizer applies weight_decay={decay} to this BatchNorm's weight/"
                    "bias, pulling the scale towards 0 for no regularization benefit",
                    "put BatchNorm parameters in a parameter group with weight_decay=0")
            for name, decay in decayed.items()]


def _input_moments(input: Tensor, axis: int) -> tuple[Tensor, Tensor, int]:
    values = input.detach().movedim(axis, -1).reshape(-1, input.shape[axis]).double()
    return values.mean(0), values.var(0, correction=0), values.shape[0]


def _check_batch(model: nn.Module, layers: dict[str, _BatchNorm], batch: object
                 ) -> list[Finding]:
    """Runs ``batch`` through the model in eval mode and compares each BatchNorm's input
    with its running statistics."""
    seen: dict[str, tuple[Tensor, Tensor, int]] = {}

    def record(name: str, module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
        if name not in seen:  # a layer called twice is judged on its first call
            seen[name] = _input_moments(args[0], getattr(module, "axis", 1) % args[0].dim())

    handles = [bn.register_forward_pre_hook(functools.partial(record, name))
               for name, bn in layers.items()]
    modes = {module: module.training for module in model.modules()}
    input = batch[0] if isinstance(batch, (tuple, list)) else batch
    try:
        model.eval()
        with torch.no_grad():
            model(input)
    except Exception as error:
        raise RuntimeError(f"doctor: the model failed on the given batch: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    findings = []
    for name, (mean, var, count) in seen.items():
        bn = layers[name]
        if count < FEW_VALUES_PER_CHANNEL:
            findings.append(Finding(
                "few-values-per-channel", "warning", name,
                f"a batch like this gives {count} values per channel (fewer than "
                f"{FEW_VALUES_PER_CHANNEL}): batch statistics are too noisy to train with",
                "use a larger batch, or GroupNorm/LayerNorm, or SyncBatchNorm across devices"))
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        running_var = bn.running_var.double() + bn.eps
        shift = math.sqrt(((mean - bn.running_mean.double()).square() / running_var)
                          .mean().item())
        ratio = math.exp(math.sqrt(torch.log((var + bn.eps) / running_var).square()
                                   .mean().item()))
        if shift > GAP_MEAN_SHIFT or ratio > GAP_VAR_RATIO:
            findings.append(Finding(
                "train-eval-gap", "warning", name,
                f"on this batch the input is {shift:.2f} running std from the running mean "
                f"and its variance is off by a factor {ratio:.2f} (RMS over channels; limits "
                f"{GAP_MEAN_SHIFT}, {GAP_VAR_RATIO}): eval outputs differ from training ones",
                "recalibrate the running statistics on training data (batchnorm.recalibrate), "
                "lower the momentum, or check that eval data is preprocessed like training data"))
    return findings


def doctor(model: nn.Module, batch: Tensor | tuple[Tensor, ...] | None = None,
           optimizer: torch.optim.Optimizer | None = None) -> list[Finding]:
    """Every BatchNorm problem found in ``model`` (empty when healthy).

    Always checked: running statistics never updated, BatchNorm in training mode inside a
    model in eval mode, frozen affine parameters whose statistics still update, float16/
    bfloat16 running buffers, a conv/linear bias cancelled by the BatchNorm after it. With
    ``batch`` (an input, or ``(input, target)``, the size of a training batch): fewer than
    :data:`FEW_VALUES_PER_CHANNEL` values per channel and a train/eval gap between running
    and batch statistics; the model runs once in eval mode, buffers unchanged. With
    ``optimizer``: weight decay on BatchNorm parameters. A lazy layer that has not seen
    input yet is only checked on ``batch`` (which initializes it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"doctor: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("doctor: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    layers = _batchnorms(model)
    built = {name: bn for name, bn in layers.items() if not is_lazy(bn.running_mean)}
    findings = [*_check_stats_never_updated(built), *_check_train_mode(model, layers),
                *_check_frozen_params(built), *_check_half_stats(built),
                *_check_redundant_bias(model)]
    if optimizer is not None:
        findings += _check_weight_decay(built, optimizer)
    if batch is not None:
        findings += _check_batch(model, layers, batch)
    return findings
