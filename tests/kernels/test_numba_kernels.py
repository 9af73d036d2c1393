"""The Numba kernels against float64 math written out here, on every canonical layout.

Tolerances: float32 kernels vs float64 math on unit-scale data with at least 8 values per
statistic (fewer make the float32 problem itself ill-conditioned), 2e-5 relative to the
largest value of the quantity compared (outputs, gradients, statistics)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm.core.activation import Activation
from batchnorm.core.layout import channel_view, group_view, row_view
from batchnorm.core.spec import NormSpec
from batchnorm.kernels import numba_cpu

RTOL = 2e-5
ACTIVATIONS = [Activation(), Activation("relu"), Activation("leaky_relu", 0.2),
               Activation("elu", 0.7), Activation("silu")]
SETTINGS = settings(max_examples=12, deadline=None)
SEEDS = st.integers(0, 2**16)


def act64(z: torch.Tensor, act: Activation) -> torch.Tensor:
    functions = {
        "identity": lambda t: t,
        "relu": torch.relu,
        "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, act.param),
        "elu": lambda t: torch.nn.functional.elu(t, act.param),
        "silu": torch.nn.functional.silu,
    }
    return functions[act.name](z)


def normalize64(x, weight, bias, dims, act, eps=1e-5):
    """act((x - mean) / sqrt(var + eps) * weight + bias) in float64, differentiable."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    return act64((x - mean) / torch.sqrt(var + eps) * weight + bias, act)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    error = (actual.double() - expected).abs().max()
    assert error <= rtol * scale, f"max error {error:.3g} > {rtol} * {scale:.3g}"


def run_kernels(x: torch.Tensor, spec: NormSpec, weight, bias, dy):
    """Forward and backward of the kernels with batch statistics, as the core runs them."""
    mean, var = numba_cpu.moments(x, spec.reduce_dims)
    invstd = torch.rsqrt(var + spec.eps)
    y = numba_cpu.normalize(x, mean, invstd, weight, bias, spec.activation)
    grad_weight, grad_bias, s1, s2 = numba_cpu.backward_reduce(dy, x, mean, invstd, weight,
                                                               bias, spec)
    count = x.numel() // mean.numel()
    dx = numba_cpu.backward_input(dy, x, mean, invstd, weight, bias, spec, s1 / count,
                                  s2 / count)
    return mean, var, y, dx, grad_weight, grad_bias


def check_view_against_float64(x: torch.Tensor, reduce_dims, param_shape, act) -> None:
    spec = NormSpec(tuple(reduce_dims), tuple(param_shape), 1e-5, act)
    assert numba_cpu.supports(x, spec)
    weight = torch.randn(param_shape) * 0.5 + 1
    bias = torch.randn(param_shape) * 0.5
    dy = torch.randn_like(x)
    mean, var, y, dx, grad_weight, grad_bias = run_kernels(x, spec, weight, bias, dy)

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    y64 = normalize64(x64, w64, b64, spec.reduce_dims, act)
    y64.backward(dy.double())
    close(mean, x64.detach().mean(spec.reduce_dims, keepdim=True))
    close(var, x64.detach().var(spec.reduce_dims, keepdim=True, correction=0))
    close(y, y64.detach())
    close(dx, x64.grad)
    close(grad_weight, w64.grad)
    close(grad_bias, b64.grad)


@SETTINGS
@given(p=st.integers(1, 6), c=st.integers(1, 9), q=st.integers(8, 70),
       act=st.sampled_from(ACTIVATIONS), seed=SEEDS)
def test_channels_first_batch_norm_matches_float64(p, c, q, act, seed):
    torch.manual_seed(seed)
    view = channel_view(torch.randn(p, c, q) * 2 + 3, 1)
    check_view_against_float64(view.x, view.reduce_dims, view.param_shape, act)


@SETTINGS
@given(m=st.integers(8, 300), c=st.integers(1, 40), act=st.sampled_from(ACTIVATIONS),
       seed=SEEDS)
def test_channels_last_batch_norm_matches_float64(m, c, act, seed):
    torch.manual_seed(seed)
    x = torch.randn(m, 1, 1, c).permute(0, 3, 1, 2) * 2 - 1  # channels_last NCHW
    view = channel_view(x, 1)
    assert view.reduce_dims == (0,)
    check_view_against_float64(view.x, view.reduce_dims, view.param_shape, act)


@SETTINGS
@given(n=st.integers(1, 4), groups=st.integers(1, 4), per_group=st.integers(1, 4),
       length=st.integers(8, 50), seed=SEEDS)
def test_group_norm_view_matches_float64(n, groups, per_group, length, seed):
    torch.manual_seed(seed)
    view = group_view(torch.randn(n, groups * per_group, length) + 5, groups)
    check_view_against_float64(view.x, view.reduce_dims, view.param_shape, Activation())


@pytest.mark.parametrize("shape", [(4, 3, 5000), (5000, 3)])
def test_layer_norm_without_parameters_takes_per_row_path(shape):
    x = torch.randn(shape)
    view = row_view(x, 1)
    spec = NormSpec(view.reduce_dims, view.param_shape, 1e-5)
    mean, var = numba_cpu.moments(view.x, spec.reduce_dims)
    y = numba_cpu.normalize(view.x, mean, torch.rsqrt(var + 1e-5), None, None, spec.activation)
    close(y, normalize64(view.x.double(), 1.0, 0.0, (1,), Activation()))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_eval_backward_uses_given_statistics(act):
    view = channel_view(torch.randn(4, 6, 30), 1)
    spec = NormSpec(view.reduce_dims, view.param_shape, 1e-5, act)
    mean, var = torch.randn(1, 6, 1), torch.rand(1, 6, 1) + 0.5
    weight, bias = torch.randn(1, 6, 1), torch.randn(1, 6, 1)
    dy = torch.randn_like(view.x)
    invstd = torch.rsqrt(var + 1e-5)
    x64 = view.x.double().requires_grad_()
    y64 = act64((x64 - mean.double()) * invstd.double() * weight.double() + bias.double(), act)
    y64.backward(dy.double())
    y = numba_cpu.normalize(view.x, mean, invstd, weight, bias, act)
    dx = numba_cpu.backward_input(dy, view.x, mean, invstd, weight, bias, spec, None, None)
    close(y, y64.detach())
    close(dx, x64.grad)


@pytest.mark.parametrize("make_view", [
    lambda x: channel_view(x, 1),
    lambda x: channel_view(x.contiguous(memory_format=torch.channels_last), 1),
    lambda x: group_view(x, 4),
], ids=["channels_first", "channels_last", "groups"])
def test_large_offset_keeps_statistics_accurate(make_view):
    """Mean 1e4, std 1 in float32: outputs within 1e-3 of float64, variance within 1e-4."""
    x = torch.randn(8, 16, 12, 12, dtype=torch.float64) + 1e4
    view = make_view(x.float())
    spec = NormSpec(view.reduce_dims, view.param_shape, 1e-5)
    mean, var = numba_cpu.moments(view.x, spec.reduce_dims)
    x64 = view.x.double()
    var64 = x64.var(spec.reduce_dims, keepdim=True, correction=0)
    assert ((var.double() - var64).abs() / var64).max() < 1e-4
    y = numba_cpu.normalize(view.x, mean, torch.rsqrt(var + 1e-5), None, None, Activation())
    y64 = (x64 - x64.mean(spec.reduce_dims, keepdim=True)) / torch.sqrt(var64 + 1e-5)
    assert (y.double() - y64).abs().max() < 1e-3


@pytest.mark.parametrize("shape,axis", [((64, 32, 40), 1), ((5000, 64), 1)])
def test_results_are_bitwise_identical_across_runs_and_thread_counts(shape, axis):
    x = torch.randn(shape) + 2
    view = channel_view(x, axis)
    spec = NormSpec(view.reduce_dims, view.param_shape, 1e-5, Activation("silu"))
    weight, bias = torch.randn(spec.param_shape), torch.randn(spec.param_shape)
    dy = torch.randn_like(view.x)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1, threads):
            torch.set_num_threads(count)
            results.append(run_kernels(view.x, spec, weight, bias, dy))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for first, again in zip(results[0], other, strict=True):
            assert torch.equal(first, again)


def test_non_finite_input_propagates_instead_of_vanishing():
    x = torch.randn(4, 3, 20)
    x[1, 2, 5] = math.nan
    view = channel_view(x, 1)
    mean, var = numba_cpu.moments(view.x, view.reduce_dims)
    assert math.isnan(mean[0, 2, 0]) and math.isnan(var[0, 2, 0])
    assert torch.isfinite(mean[0, :2]).all()
    y = numba_cpu.normalize(view.x, mean, torch.rsqrt(var + 1e-5), None, None,
                            Activation("relu"))
    assert torch.isnan(y[:, 2]).all()


@pytest.mark.parametrize("act", ACTIVATIONS[:2], ids=lambda a: a.name)
def test_ghost_batch_view_matches_float64(act):
    """(chunks, P / chunks, C, Q) reduced over (1, 3): statistics per ghost batch."""
    view = channel_view(torch.randn(12, 5, 20) + 1, 1)
    x = view.x.view(3, 4, 5, 20)
    check_view_against_float64(x, (1, 3), (1, 1, 5, 1), act)


def check_fused_against_float64(x: torch.Tensor, reduce_dims, param_shape, act: Activation,
                                affine: bool) -> None:
    """forward_batch / backward_batch (one visit per statistics block) against float64."""
    spec = NormSpec(tuple(reduce_dims), tuple(param_shape), 1e-5, act)
    assert numba_cpu.fuses(x, spec)
    weight = torch.randn(param_shape) * 0.5 + 1 if affine else None
    bias = torch.randn(param_shape) * 0.5 if affine else None
    dy = torch.randn_like(x)
    y, mean, invstd = numba_cpu.forward_batch(x, weight, bias, spec)
    dx, grad_weight, grad_bias = numba_cpu.backward_batch(dy, x, mean, invstd, weight, bias,
                                                          spec)
    x64 = x.double().requires_grad_()
    w64, b64 = ((t.double().requires_grad_() for t in (weight, bias)) if affine
                else (1.0, 0.0))
    y64 = normalize64(x64, w64, b64, spec.reduce_dims, act)
    y64.backward(dy.double())
    var64 = x64.detach().var(spec.reduce_dims, keepdim=True, correction=0)
    close(mean, x64.detach().mean(spec.reduce_dims, keepdim=True))
    close(invstd, torch.rsqrt(var64 + 1e-5))
    close(y, y64.detach())
    close(dx, x64.grad)
    if affine:
        close(grad_weight, w64.grad)
        close(grad_bias, b64.grad)
    else:
        assert grad_weight is None and grad_bias is None


def check_fused_rows_against_float64(x: torch.Tensor, act: Activation, affine: bool) -> None:
    check_fused_against_float64(x, (1,), (1, x.shape[1]), act, affine)


@SETTINGS
@given(n=st.integers(1, 4), groups=st.integers(1, 4), per_group=st.integers(1, 4),
       length=st.integers(2, 60), act=st.sampled_from(ACTIVATIONS), affine=st.booleans(),
       seed=SEEDS)
def test_fused_group_norm_view_matches_float64(n, groups, per_group, length, act, affine,
                                               seed):
    torch.manual_seed(seed)
    if per_group * length < 8:
        length = 8  # fewer values per group make the float32 problem ill-conditioned
    view = group_view(torch.randn(n, groups * per_group, length) * 2 + 5, groups)
    check_fused_against_float64(view.x, view.reduce_dims, view.param_shape, act, affine)


def test_fused_instance_norm_with_long_rows_matches_float64():
    view = group_view(torch.randn(2, 3, 3 * 4096 + 7) + 1, 3)
    check_fused_against_float64(view.x, view.reduce_dims, view.param_shape, ACTIVATIONS[0],
                                True)


@SETTINGS
@given(rows=st.integers(1, 200), width=st.integers(8, 300), act=st.sampled_from(ACTIVATIONS),
       affine=st.booleans(), seed=SEEDS)
def test_fused_layer_norm_rows_match_float64(rows, width, act, affine, seed):
    torch.manual_seed(seed)
    check_fused_rows_against_float64(torch.randn(rows, width) * 3 - 1, act, affine)


def test_fused_rows_longer_than_a_summation_chunk_match_float64():
    check_fused_rows_against_float64(torch.randn(3, 3 * 4096 + 5) + 2, ACTIVATIONS[1], True)


@pytest.mark.parametrize("make_view", [lambda x: row_view(x, 3), lambda x: group_view(x, 4)],
                         ids=["rows", "groups"])
def test_fused_statistics_keep_large_offsets_accurate(make_view):
    """Mean 1e4, std 1 in float32: outputs within 1e-3 of float64, invstd within 1e-4
    relative."""
    view = make_view((torch.randn(8, 16, 12, 12, dtype=torch.float64) + 1e4).float())
    spec = NormSpec(view.reduce_dims, view.param_shape, 1e-5)
    y, _, invstd = numba_cpu.forward_batch(view.x, None, None, spec)
    x64 = view.x.double()
    var64 = x64.var(spec.reduce_dims, keepdim=True, correction=0)
    assert ((invstd.double() - torch.rsqrt(var64 + 1e-5)).abs() * var64.sqrt()).max() < 1e-4
    y64 = (x64 - x64.mean(spec.reduce_dims, keepdim=True)) / torch.sqrt(var64 + 1e-5)
    assert (y.double() - y64).abs().max() < 1e-3


def test_fused_rows_are_bitwise_identical_across_thread_counts():
    x, dy = torch.randn(5000, 64), torch.randn(5000, 64)
    weight, bias = torch.randn(1, 64), torch.randn(1, 64)
    spec = NormSpec((1,), (1, 64), 1e-5, Activation("silu"))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1):
            torch.set_num_threads(count)
            y, mean, invstd = numba_cpu.forward_batch(x, weight, bias, spec)
            results.append((y, *numba_cpu.backward_batch(dy, x, mean, invstd, weight, bias,
                                                         spec)))
    finally:
        torch.set_num_threads(threads)
    for first, again in zip(*results, strict=True):
        assert torch.equal(first, again)


def test_rows_with_parameters_refuse_the_unfused_calls():
    """LayerNorm rows always normalize with their own statistics: only the fused pair runs
    them, and the separate calls say so instead of treating rows as columns."""
    x, weight = torch.randn(6, 10), torch.randn(1, 10)
    mean, invstd = x.mean(1, keepdim=True), torch.ones(6, 1)
    with pytest.raises(ValueError, match="forward_batch and backward_batch"):
        numba_cpu.normalize(x, mean, invstd, weight, None, Activation())
