"""The compiled CPU implementations of the operators (batchnorm/csrc/norm_ops.cpp and
autograd.cpp) against their specification, the composite implementation in Python
(:mod:`batchnorm.core.normalize` over kernel primitives): in float64 over the reference
primitives, and in the input's dtype over the same C++ primitives, where only the order of
a few sums and the rounding of square roots may differ. Cases: BatchNorm, ghost batches with
an uneven last chunk, Batch Renormalization, InstanceNorm, GroupNorm and LayerNorm, NCHW and
channels-last, float32, float64 and bfloat16 (with float32 parameters), with a mean offset
and a constant channel. Also: that the CPU kernels are the compiled ones, what a forced
backend and a rejected batch do, and that importing never compiles."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.core import normalize
from batchnorm.core.policy import update_running_stats
from batchnorm.kernels import cpu, extension, reference

ops = torch.ops.batchnorm
OPERATORS = ("batch_norm", "batch_norm_backward", "group_norm", "group_norm_backward",
             "layer_norm", "layer_norm_backward")
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EPS = 1e-3


@pytest.fixture(scope="module", autouse=True)
def compiled_operators():
    """These tests are about the compiled operators: the default backend, also in the
    suite's passes that force another one with BATCHNORM_BACKEND."""
    if not extension.available():
        pytest.skip("the C++ CPU kernels could not be built on this machine (see the warning)")
    with kernels.use_backend(None):
        yield


def _data(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
          offset: float) -> torch.Tensor:
    """Values with a mean offset, channel 0 constant."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + offset
    x[:, 0] = offset + 0.5
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _parameters(channels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float32 parameters and buffers beside bfloat16 input (mixed precision)."""
    dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return {"weight": torch.linspace(0.5, 1.5, channels, dtype=dtype),
            "bias": torch.linspace(-1, 1, channels, dtype=dtype),
            "running_mean": torch.linspace(-0.5, 0.5, channels, dtype=dtype),
            "running_var": torch.linspace(0.5, 2, channels, dtype=dtype)}


def _float64(values):
    return [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for v in values]


def _check(actual, expected, dtype: torch.dtype, rtol: float, atol: float, what: str):
    """Tensors of the same shape, dtype and strides; values within atol * (max |expected|,
    at least 1) + rtol * |expected|, in float64."""
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        e = torch.empty(0) if e is None else e
        assert a.shape == e.shape, (what, index)
        if a.numel() == 0:
            continue
        scale = max(1.0, e.double().abs().max().item())
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol * scale,
                                   msg=f"{what}, output {index}")


# (name, input shape, training, chunk, renorm clipping, activation)
BATCH_NORM_CASES = [
    ("batch norm", (6, 4, 5, 5), True, 0, None, "identity"),
    ("batch norm (N, C)", (8, 16), True, 0, None, "identity"),
    ("eval", (6, 4, 5, 5), False, 0, None, "identity"),
    ("ghost, uneven last chunk", (8, 4, 3, 3), True, 3, None, "identity"),
    ("renorm", (6, 4, 5, 5), True, 0, [1.2, 0.8, 0.1], "identity"),
    ("ghost renorm + silu", (8, 4, 3, 3), True, 3, [1.2, 0.8, 0.1], "silu"),
    ("instance norm", (3, 4, 6, 5), True, 1, None, "identity"),
    ("relu", (6, 4, 5, 5), True, 0, None, "relu"),
]


def _batch_norm_args(shape, training, chunk, clipping, activation, dtype, channels_last,
                     offset):
    """The arguments of :func:`normalize.batch_norm_forward` after its primitives."""
    x = _data(shape, dtype, channels_last and len(shape) == 4, offset)
    p = _parameters(shape[1], dtype)
    return (x, p["weight"], p["bias"], p["running_mean"], p["running_var"], training, EPS, 1,
            chunk, activation, 0.0, clipping, None, None)


def _batch_norm_operator(args):
    """The operator on the same arguments, with copies of the running buffers: it moves
    the buffers it is given in training, which the composite it is compared with reads."""
    (x, weight, bias, running_mean, running_var, training, eps, axis, chunk, activation,
     param, clipping, renorm_mean, renorm_var) = args
    if running_mean is not None:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    return ops.batch_norm(x, weight, bias, running_mean, running_var, None, training, 0.1, eps,
                          axis, chunk, activation, param, clipping, renorm_mean, renorm_var)


def _batch_norm_backward(prims, args, forward):
    x = args[0]
    dy = torch.cos(torch.arange(x.numel(), dtype=torch.float64).view(x.shape)).to(x.dtype)
    grads = []
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        options = (args[5], EPS, 1, args[8], args[9], 0.0, mask)
        if prims is None:
            grads += list(ops.batch_norm_backward(dy, x, *args[1:3], *forward[1:], *options))
        else:
            dy_, x_, w_, b_ = (dy, x, *args[1:3]) if prims is cpu else _float64((dy, x,
                                                                                 *args[1:3]))
            grads += list(normalize.batch_norm_backward(prims, dy_, x_, w_, b_, *forward[1:],
                                                        *options)[:3])
    return grads


# a relu gate at z = 0 may flip between precisions: relu is compared over the same kernels
SMOOTH_CASES = [case for case in BATCH_NORM_CASES if case[5] != "relu"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMOOTH_CASES, ids=[c[0] for c in SMOOTH_CASES])
def test_batch_norm_matches_the_composite_in_float64(case, dtype, channels_last):
    """Outputs and gradients within the input dtype's precision of the composite's in
    float64 under a mean offset of 100 (bfloat16: its rounding of the output)."""
    _, shape, training, chunk, clipping, activation = case
    args = _batch_norm_args(shape, training, chunk, clipping, activation, dtype,
                            channels_last, 100.0)
    actual = _batch_norm_operator(args)
    expected = normalize.batch_norm_forward(reference, *_float64(args))
    atol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2}[dtype]
    _check(actual, expected, dtype, 0, atol, "forward")
    _check(_batch_norm_backward(None, args, actual),
           _batch_norm_backward(reference, args, _float64(expected)), dtype, 0, 4 * atol,
           "backward")


def _same_kernel_tolerance(dtype: torch.dtype) -> float:
    """A few roundings of the accumulation dtype (float32 for bfloat16 statistics, whose
    outputs round once more: one bfloat16 step)."""
    return {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BATCH_NORM_CASES, ids=[c[0] for c in BATCH_NORM_CASES])
def test_batch_norm_matches_the_composite_over_the_same_kernels(case, dtype, channels_last):
    """Same dtype, same primitives: the table math reproduces the composite's to a few
    roundings, and output memory formats are identical."""
    _, shape, training, chunk, clipping, activation = case
    args = _batch_norm_args(shape, training, chunk, clipping, activation, dtype,
                            channels_last, 3.0)
    actual = _batch_norm_operator(args)
    expected = normalize.batch_norm_forward(cpu, *args)
    assert actual[0].stride() == expected[0].stride()
    tolerance = _same_kernel_tolerance(dtype)
    _check(actual, expected, dtype, tolerance, tolerance, "forward")
    actual_grads = _batch_norm_backward(None, args, actual)
    expected_grads = _batch_norm_backward(cpu, args, expected)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        if e is not None:
            assert a.stride() == e.stride() and a.dtype == e.dtype
    _check(actual_grads, expected_grads, dtype, tolerance, tolerance, "backward")


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_a_gradient_in_the_other_memory_format_gives_the_same_gradients(channels_last):
    """The backward operators read the gradient in the input's memory order: one laid out
    the other way is copied into it, not read as if it were."""
    x = _data((6, 4, 5, 5), torch.float32, channels_last, 3.0)
    p = _parameters(4, torch.float32)
    weight, bias = p["weight"], p["bias"]
    dy = torch.cos(torch.arange(x.numel(), dtype=torch.float32)).view(x.shape)
    layouts = [dy.contiguous(memory_format=torch.channels_last), dy]
    same, other = layouts if channels_last else layouts[::-1]
    _, mean, var, r, d = ops.batch_norm(x, weight, bias, None, None, None, True, 0.1, EPS)
    _, group_mean, group_invstd = ops.group_norm(x, weight, bias, 2, EPS)
    backwards = [
        lambda g: ops.batch_norm_backward(g, x, weight, bias, mean, var, r, d, True, EPS, 1, 0,
                                          "identity", 0.0, [True, True, True]),
        lambda g: ops.group_norm_backward(g, x, weight, bias, group_mean, group_invstd, 2,
                                          [True, True, True])]
    for backward in backwards:
        for actual, expected in zip(backward(other), backward(same), strict=True):
            assert actual.stride() == expected.stride() and torch.equal(actual, expected)


def _statistics_counts(shape: tuple[int, ...], chunk: int) -> tuple[int, int]:
    values = torch.Size(shape).numel() // shape[1]
    if not chunk:
        return values, values
    batch = shape[0]
    return values // batch * min(chunk, batch), values // batch * (batch % chunk or chunk)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["0.1", "0.7", "cumulative"])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("case", BATCH_NORM_CASES[:2] + BATCH_NORM_CASES[3:4]
                         + BATCH_NORM_CASES[6:7], ids=["bn", "bn (N, C)", "ghost", "instance"])
def test_the_running_statistics_follow_as_the_composite_moves_them(case, buffer_dtype,
                                                                   momentum):
    """The forward operator moves the buffers as the composite's update does with the
    statistics it returns, chunk counts included."""
    _, shape, _, chunk, _, _ = case
    dtype = torch.float64 if buffer_dtype == torch.float64 else torch.float32
    x, weight, bias, *_ = _batch_norm_args(shape, True, chunk, None, "identity", dtype, False,
                                           3.0)
    p = _parameters(shape[1], buffer_dtype)
    buffers = [p["running_mean"].to(buffer_dtype), p["running_var"].to(buffer_dtype),
               torch.tensor(4)]
    expected = [b.clone() for b in buffers]
    _, mean, var, _, _ = ops.batch_norm(x, weight, bias, *buffers, True, momentum, EPS, 1,
                                        chunk)
    update_running_stats(*expected, mean, var, *_statistics_counts(shape, chunk), momentum)
    for actual, wanted in zip(buffers, expected, strict=True):
        tolerance = _same_kernel_tolerance(wanted.dtype) if wanted.is_floating_point() else 0
        torch.testing.assert_close(actual, wanted, rtol=tolerance, atol=tolerance)


GROUP_NORM_CASES = [((3, 4, 6, 5), 2), ((3, 4, 6, 5), 1), ((16, 8, 3, 3), 4), ((4, 6), 3)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES,
                         ids=[f"{s}/{g}" for s, g in GROUP_NORM_CASES])
def test_group_norm_matches_the_composite(shape, groups, dtype, channels_last):
    """In float64 over the reference primitives, and over the same kernels."""
    x = _data(shape, dtype, channels_last and len(shape) == 4, 3.0)
    p = _parameters(shape[1], dtype)
    dy = torch.cos(torch.arange(x.numel(), dtype=torch.float64).view(shape)).to(dtype)
    args = (x, p["weight"], p["bias"], groups, EPS)
    actual = ops.group_norm(*args)
    grads = ops.group_norm_backward(dy, *args[:3], *actual[1:], groups, [True, True, True])
    for prims, tolerance, atol in (
            (reference, 0, {torch.float32: 2e-6, torch.float64: 1e-12,
                            torch.bfloat16: 1.6e-2}[dtype]),
            (cpu, _same_kernel_tolerance(dtype), _same_kernel_tolerance(dtype))):
        cast = _float64 if prims is reference else list
        expected = normalize.group_norm_forward(prims, *cast(args))
        expected_grads = normalize.group_norm_backward(prims, *cast((dy, *args[:3])),
                                                       *expected[1:], groups,
                                                       [True, True, True])
        if prims is cpu:
            assert actual[0].stride() == expected[0].stride()
        _check(actual, expected, dtype, tolerance, atol, "forward")
        _check(grads, expected_grads, dtype, tolerance, 4 * atol, "backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_ndim", [((3, 5, 4, 7), 2), ((16, 32), 1)],
                         ids=["(3, 5, 4, 7)/2", "(16, 32)/1"])
def test_layer_norm_matches_the_composite(shape, normalized_ndim, dtype):
    x = _data(shape, dtype, False, 3.0)
    normalized = shape[-normalized_ndim:]
    parameter_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    weight = torch.linspace(0.5, 1.5, torch.Size(normalized).numel(),
                            dtype=parameter_dtype).view(normalized)
    bias = torch.linspace(-1, 1, weight.numel(), dtype=parameter_dtype).view(normalized)
    dy = torch.cos(torch.arange(x.numel(), dtype=torch.float64).view(shape)).to(dtype)
    args = (x, normalized_ndim, weight, bias, EPS)
    actual = ops.layer_norm(*args)
    grads = ops.layer_norm_backward(dy, x, normalized_ndim, weight, bias, *actual[1:],
                                    [True, True, True])
    expected = normalize.layer_norm_forward(cpu, *args)
    expected_grads = normalize.layer_norm_backward(cpu, dy, x, normalized_ndim, weight, bias,
                                                   *expected[1:], [True, True, True])
    tolerance = _same_kernel_tolerance(dtype)
    _check(actual, expected, dtype, tolerance, tolerance, "forward")
    _check(grads, expected_grads, dtype, tolerance, tolerance, "backward")


@pytest.mark.parametrize("shape", [(0, 3), (4, 3, 0), (0, 3, 2, 2)], ids=str)
def test_empty_inputs_match_the_composite(shape):
    x = torch.randn(shape)
    p = _parameters(3, torch.float32)
    batch_norm = (x, p["weight"], p["bias"], p["running_mean"], p["running_var"])
    cases = [
        (_batch_norm_operator, normalize.batch_norm_forward,
         (*batch_norm, True, EPS, 1, 0, "identity", 0.0, None, None, None)),
        (_batch_norm_operator, normalize.batch_norm_forward,
         (*batch_norm, False, EPS, 1, 0, "identity", 0.0, None, None, None)),
        (lambda args: ops.group_norm(*args), normalize.group_norm_forward,
         (x, p["weight"], p["bias"], 3, EPS)),
    ]
    for operator, composite, args in cases:
        actual, expected = operator(args), composite(cpu, *args)
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape and a.dtype == e.dtype
            if a.numel():
                assert torch.equal(a, e)
    grads = ops.batch_norm_backward(x, x, p["weight"], p["bias"], torch.zeros(1, 3),
                                    torch.ones(1, 3), torch.empty(0), torch.empty(0), True,
                                    EPS, 1, 0, "identity", 0.0, [True, True, True])
    assert grads[0].shape == x.shape and not grads[0].any()
    assert torch.equal(grads[1], torch.zeros(3)) and torch.equal(grads[2], torch.zeros(3))


@pytest.mark.parametrize("backend", [None, "torch"], ids=["compiled", "composite"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_a_direct_operator_call_with_a_short_per_channel_tensor_raises(name, backend):
    """The kernels index weight, bias and buffers up to the channel count: one value short
    must raise (naming the tensor, on either path), never read past its end nor move a
    buffer."""
    x = _data((6, 4, 5, 5), torch.float32, False, 0.0)
    p = _parameters(4, torch.float32)
    short = dict(p, **{name: p[name][:3]})
    before = {key: t.clone() for key, t in short.items()}
    with kernels.use_backend(backend):
        for training in (True, False):
            with pytest.raises(RuntimeError,
                               match=f"batch_norm: {name} has 3 values, expected 4"):
                ops.batch_norm(x, short["weight"], short["bias"], short["running_mean"],
                               short["running_var"], None, training, 0.1, EPS)
        if name in ("weight", "bias"):
            with pytest.raises(RuntimeError,
                               match=f"group_norm: {name} has 3 values, expected 4"):
                ops.group_norm(x, short["weight"], short["bias"], 2, EPS)
            rows = x.permute(0, 2, 3, 1)
            with pytest.raises(RuntimeError,
                               match=f"layer_norm: {name} has 3 values, expected 4"):
                ops.layer_norm(rows, 1, short["weight"], short["bias"], EPS)
    assert all(torch.equal(short[key], t) for key, t in before.items())


@pytest.mark.parametrize("backend", [None, "torch"], ids=["compiled", "composite"])
def test_a_direct_backward_call_with_mismatched_tensors_raises(backend):
    """The backward operators check what they index, on either path: the gradient's shape,
    the parameters' and the statistics' sizes (two ghost batches of 3 samples have 2 x 4
    statistics)."""
    x = _data((6, 4, 5, 5), torch.float32, False, 0.0)
    grad, w, empty = torch.randn_like(x), torch.ones(4), torch.empty(0)
    mean, var = torch.zeros(1, 4), torch.ones(1, 4)
    rows = x.permute(0, 2, 3, 1)
    mask = [True, True, True]
    cases = {
        "batch_norm_backward: weight has 3 values, expected 4": lambda: ops.batch_norm_backward(
            grad, x, w[:3], None, mean, var, empty, empty, True, EPS, 1, 0, "identity", 0.0,
            mask),
        r"batch_norm_backward: grad_output has shape \[2, 4, 5, 5\]":
            lambda: ops.batch_norm_backward(grad[:2], x, w, None, mean, var, empty, empty, True,
                                            EPS, 1, 0, "identity", 0.0, mask),
        "batch_norm_backward: mean has 4 values, expected 8": lambda: ops.batch_norm_backward(
            grad, x, w, None, mean, var, empty, empty, True, EPS, 1, 3, "identity", 0.0, mask),
        "group_norm_backward: invstd has 12 values, expected 6": lambda: ops.group_norm_backward(
            grad, x, w, None, torch.zeros(6, 1), torch.ones(6, 2), 1, mask),
        "layer_norm_backward: weight has 2 values, expected 4": lambda: ops.layer_norm_backward(
            grad.permute(0, 2, 3, 1), rows, 1, w[:2], None, torch.zeros(150),
            torch.ones(150), mask),
        "layer_norm_backward: mean has 140 values, expected 150":
            lambda: ops.layer_norm_backward(grad.permute(0, 2, 3, 1), rows, 1, w, None,
                                            torch.zeros(140), torch.ones(150), mask),
    }
    for message, call in cases.items():
        with kernels.use_backend(backend), pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("backend", [None, "torch"], ids=["compiled", "composite"])
@pytest.mark.parametrize("chunk", [0, 3], ids=["batch", "ghost"])
def test_a_non_finite_batch_raises_before_any_buffer_changes(chunk, backend):
    x = _data((6, 4, 5, 5), torch.float32, False, 0.0)
    x[2, 1, 3, 3] = float("nan")
    p = _parameters(4, torch.float32)
    buffers = [p["running_mean"], p["running_var"], torch.tensor(2)]
    before = [b.clone() for b in buffers]
    with kernels.use_backend(backend), pytest.raises(
            ValueError, match="input contains NaN or infinity: batch statistics are not finite"):
        ops.batch_norm(x, p["weight"], p["bias"], *buffers, True, 0.1, EPS, 1, chunk)
    for buffer, original in zip(buffers, before, strict=True):
        assert torch.equal(buffer, original)


def test_buffer_overflow_raises_with_the_composites_message():
    """A batch mean of 1e5 with momentum 0.9 moves float16 buffers to 9e4, past their
    largest value (65504)."""
    x = torch.full((8, 3), 1e5) + torch.tensor([-1.0, 1.0]).repeat(4)[:, None]

    def message(backend) -> str:
        buffers = [torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16),
                   None]
        with kernels.use_backend(backend), pytest.raises(ValueError) as error:
            ops.batch_norm(x, None, None, *buffers, True, 0.9, EPS)
        assert torch.equal(buffers[0], torch.zeros(3, dtype=torch.float16))
        return str(error.value)

    expected = message("torch")
    assert message(None) == expected
    assert "running_mean overflows its torch.float16 buffer (new values up to 9e+04)" in \
        expected


@pytest.mark.parametrize("backend", [None, "torch"], ids=["compiled", "composite"])
def test_each_training_forward_moves_every_buffers_version_once(backend):
    """In-place updates are visible to autograd's version checks, as torch's copy_ makes
    them, with and without autograd recording the call."""
    buffers = _parameters(3, torch.float32)
    counter = torch.tensor(0)
    tracked = (buffers["running_mean"], buffers["running_var"], counter)
    for requires_grad in (False, True):
        versions = [t._version for t in tracked]
        x = torch.randn(8, 3, requires_grad=requires_grad)
        with kernels.use_backend(backend):
            ops.batch_norm(x, None, None, *tracked, True, 0.1, EPS)
        assert [t._version for t in tracked] == [v + 1 for v in versions]


def test_the_cpu_kernels_are_the_compiled_ones_without_python():
    """Each operator has a CPU kernel of its own (the composite is registered for
    CompositeExplicitAutograd only), the differentiable ones an AutogradCPU kernel, and a
    training step runs no primitive through Python (the composite calls them as operators)."""
    for name in OPERATORS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"batchnorm::{name}", "CPU")
    for name in ("batch_norm", "group_norm", "layer_norm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"batchnorm::{name}",
                                                              "AutogradCPU")
    model = torch.nn.Sequential(batchnorm.BatchNorm2d(4), batchnorm.GroupNorm(2, 4),
                                batchnorm.LayerNorm(5))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with torch.profiler.profile() as profile:
        model(x).sum().backward()
    names = {event.name for event in profile.events()}
    assert "batchnorm::batch_norm" in names and "batchnorm::layer_norm_backward" in names
    assert not {name for name in names if name.startswith("batchnorm_cpu::")}


def test_a_forced_backend_reaches_the_operators(monkeypatch):
    calls = []
    forward = normalize.batch_norm_forward

    def counted(prims, *args, **kwargs):
        calls.append(prims)
        return forward(prims, *args, **kwargs)

    monkeypatch.setattr(normalize, "batch_norm_forward", counted)
    p = _parameters(4, torch.float32)
    args = (torch.randn(6, 4), p["weight"], p["bias"], None, None, None, True, 0.1, EPS)
    compiled = ops.batch_norm(*args)
    assert calls == []
    with kernels.use_backend("torch"):
        composite = ops.batch_norm(*args)
    assert calls == [reference]
    torch.testing.assert_close(compiled, composite)
    ops.batch_norm(*args)
    assert calls == [reference]


def test_importing_loads_a_cached_build_and_never_compiles(tmp_path):
    """A fresh cache directory: nothing to load at import (and no build, which takes
    minutes), so the CPU kernel is the composite until the first call builds it; the
    machine's cache: loaded at import; a forced torch backend: not loaded."""
    code = ("import torch, batchnorm.ops; print(torch._C._dispatch_has_kernel_for_dispatch_key("
            "'batchnorm::batch_norm', 'CPU'))")

    inherited = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}

    def registered(**env: str) -> bool:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**inherited, **env}, timeout=300, check=True)
        return result.stdout.strip() == "True"

    assert registered(BATCHNORM_CACHE_DIR=str(extension.build_directory().parent))
    assert not registered(BATCHNORM_CACHE_DIR=str(tmp_path))
    assert not os.listdir(tmp_path)
    assert not registered(BATCHNORM_CACHE_DIR=str(extension.build_directory().parent),
                          BATCHNORM_BACKEND="torch")


class _Block(torch.nn.Module):
    """Every operator with a direct binding: BatchNorm, its residual form, GroupNorm and
    LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = batchnorm.BatchNorm2d(4)
        self.tail = batchnorm.BatchNorm2d(4, activation="relu")
        self.gn = batchnorm.GroupNorm(2, 4)
        self.ln = batchnorm.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.gn(self.tail(self.bn(x), x)))


def _block_run() -> list[torch.Tensor]:
    """Two training steps and an eval forward of a fresh block with a mean offset: outputs,
    gradients and buffers."""
    torch.manual_seed(0)
    block = _Block()
    results = []
    for _ in range(2):
        x = (torch.randn(3, 4, 5, 5) + 50.0).requires_grad_()
        y = block(x)
        y.backward(torch.randn_like(y))
        results += [y.detach(), x.grad, *(p.grad for p in block.parameters())]
    results += [*block.buffers(), block.eval()(torch.randn(3, 4, 5, 5) + 50.0)]
    return results


def test_eager_calls_take_the_direct_bindings_and_compute_what_torch_ops_does(monkeypatch):
    """Eager layer calls enter each operator through the library's direct binding
    (batchnorm/csrc/python.cpp); the results are those of the torch.ops object, bitwise.
    A __torch_function__ mode (as FX and non-strict export use) gets the torch.ops call."""
    bindings = extension.bindings()
    called = []

    class Counted:
        def __getattr__(self, name: str):
            called.append(name)
            return getattr(bindings, name)

    monkeypatch.setattr(extension, "bindings", Counted)
    direct = _block_run()
    assert set(called) == {"batch_norm", "batch_norm_add", "group_norm", "layer_norm"}
    monkeypatch.setattr(extension, "bindings", lambda: None)
    for a, b in zip(direct, _block_run(), strict=True):
        assert torch.equal(a, b)

    seen: list[str] = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if "batchnorm" in str(func):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(extension, "bindings", Counted)
    called.clear()
    with Record():
        _Block()(torch.randn(3, 4, 5, 5))
    assert not called
    assert {f"batchnorm.{name}.default" for name in
            ("batch_norm", "batch_norm_add", "group_norm", "layer_norm")} <= set(seen)


def test_errors_from_a_direct_binding_keep_their_python_types():
    """A C++ error raised below the binding reaches Python as torch raises it."""
    p = _parameters(4, torch.float32)
    x = _data((6, 4, 5, 5), torch.float32, False, 0.0)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        extension.bindings().batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 1, 0,
                                        "swish")
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="input contains NaN or infinity"):
        extension.bindings().batch_norm(x, p["weight"], p["bias"], p["running_mean"],
                                        p["running_var"], None, True, 0.1, EPS)


def test_direct_bindings_run_without_the_gil_under_anomaly_mode_and_threads():
    """The bindings release the GIL around the operator: autograd's anomaly mode (which
    takes the GIL to record each node's Python stack) and layers called from several
    threads at once still work."""
    with torch.autograd.detect_anomaly():
        _block_run()
    errors = []

    def train() -> None:
        try:
            layer = batchnorm.BatchNorm1d(16)
            for _ in range(20):
                layer(torch.randn(8, 16, requires_grad=True)).sum().backward()
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=train) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads)
