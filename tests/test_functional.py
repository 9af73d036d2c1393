"""batchnorm.functional against torch.nn.functional, including property tests over random
shapes, and moments() against torch.var_mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import functional as F

# float64 on both sides: only the summation order differs.
RTOL = ATOL = 1e-10

shapes = st.lists(st.integers(1, 5), min_size=2, max_size=5).filter(
    lambda s: s[0] * (s[2] if len(s) > 2 else 1) * max(1, len(s) > 3 and s[3]) > 1)


def _tensor(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), momentum=st.floats(0.0, 1.0),
       channels_last=st.booleans())
def test_batch_norm_training_equals_torch_on_random_shapes(shape, seed, momentum,
                                                           channels_last):
    x = _tensor(shape, seed)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    if x.numel() // channels <= 1:
        return
    weight, bias = _tensor((channels,), seed + 1), _tensor((channels,), seed + 2)
    stats = [torch.zeros(channels, dtype=torch.float64), torch.ones(channels,
                                                                    dtype=torch.float64)]
    expected_stats = [t.clone() for t in stats]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = F.batch_norm(a, *stats, weight, bias, True, momentum)
    expected = TF.batch_norm(b, *expected_stats, weight, bias, True, momentum)
    torch.testing.assert_close(y, expected, rtol=RTOL, atol=ATOL)
    grad = _tensor(shape, seed + 3)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
    for actual, reference in zip(stats, expected_stats, strict=True):
        torch.testing.assert_close(actual, reference, rtol=RTOL, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=3, max_size=5), seed=st.integers(0, 999),
       groups_choice=st.integers(0, 3))
def test_group_instance_and_layer_norm_equal_torch_on_random_shapes(shape, seed,
                                                                    groups_choice):
    x = _tensor(shape, seed)
    channels = shape[1]
    divisors = [g for g in range(1, channels + 1) if channels % g == 0]
    groups = divisors[groups_choice % len(divisors)]
    weight = _tensor((channels,), seed + 1)
    if x.numel() // groups == 1:  # one value per group: both refuse (message in test_errors)
        for group_norm in (F.group_norm, TF.group_norm):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                group_norm(x, groups, weight, weight)
    else:
        torch.testing.assert_close(F.group_norm(x, groups, weight, weight),
                                   TF.group_norm(x, groups, weight, weight), rtol=RTOL,
                                   atol=ATOL)
    if x[0, 0].numel() > 1:
        torch.testing.assert_close(F.instance_norm(x, weight=weight),
                                   TF.instance_norm(x, weight=weight), rtol=RTOL, atol=ATOL)
    normalized = tuple(shape[2:])
    torch.testing.assert_close(F.layer_norm(x, normalized), TF.layer_norm(x, normalized),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32_and_returns_input_dtype(dtype):
    x = (torch.randn(8, 4, 6, 6, dtype=torch.float64) * 3 + 50)
    mean, var = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x.to(dtype), mean, var, training=True)
    assert y.dtype == dtype
    assert mean.dtype == torch.float32
    # the only error is rounding the input and the output to ``dtype``: 1/64 relative to
    # the input's ~50 magnitude is what the input rounding allows, plus an output ulp.
    expected = TF.batch_norm(x.to(dtype).double(), None, None, training=True)
    torch.testing.assert_close(y.double(), expected, rtol=1 / 64, atol=1 / 64)


@pytest.mark.parametrize("dims", [0, (0, 2), [1, -1], (0, 1, 2, 3)])
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_moments_equal_torch_var_mean(dims, correction, keepdim):
    x = _tensor((3, 4, 5, 6), 0) + 1e3
    var, mean = torch.var_mean(x, dims, correction=correction, keepdim=keepdim)
    actual_mean, actual_var = F.moments(x, dims, correction=correction, keepdim=keepdim)
    torch.testing.assert_close(actual_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual_var, var, rtol=1e-10, atol=1e-12)


def test_moments_of_float32_with_large_offset_stay_accurate():
    """E[x^2] - E[x]^2 in float32 would lose every digit here; the shifted sums keep 1e-4."""
    x64 = torch.randn(1000, 64, dtype=torch.float64) + 1e4
    _, var = F.moments(x64.float(), 0)
    expected = x64.float().double().var(0, unbiased=False)
    assert ((var.double() - expected) / expected).abs().max() < 1e-4


def test_eval_batch_norm_requires_running_statistics():
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)
