"""Bad input raises the same exception type as torch.nn, with torch's message except where
torch's words are backwards (a channel count mismatch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def _raised(make, call) -> tuple[type[BaseException], str]:
    with pytest.raises(Exception) as info:  # the type is what the caller compares
        call(make())
    return info.type, str(info.value)


CASES = {
    "wrong rank 1d": ("BatchNorm1d", (3,), {}, (2, 3, 4, 5)),
    "wrong rank 2d": ("BatchNorm2d", (3,), {}, (2, 3, 4)),
    "wrong rank 3d": ("BatchNorm3d", (3,), {}, (2, 3, 4, 5)),
    "wrong rank instance 2d": ("InstanceNorm2d", (3,), {}, (2, 3)),
    "one value per channel": ("BatchNorm1d", (4,), {}, (1, 4)),
    "one spatial value instance": ("InstanceNorm1d", (4,), {}, (3, 4, 1)),
    "eps zero in training": ("BatchNorm2d", (3,), {"eps": 0.0}, (2, 3, 4, 5)),
    "eps negative in training": ("BatchNorm1d", (3,), {"eps": -1e-5}, (4, 3)),
    "group norm channels not divisible at call": ("GroupNorm", (2, 4), {}, (2, 6, 5)),
    "group norm one value per group": ("GroupNorm", (2, 2), {}, (1, 2, 1)),
    "layer norm shape": ("LayerNorm", (5,), {}, (3, 4)),
    "instance norm affine channels": ("InstanceNorm1d", (4,), {"affine": True}, (2, 3, 5)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_type_and_message_equal_torch(case):
    name, args, kwargs, shape = case
    x = torch.randn(shape)
    expected = _raised(lambda: getattr(nn, name)(*args, **kwargs), lambda m: m(x))
    actual = _raised(lambda: getattr(batchnorm, name)(*args, **kwargs), lambda m: m(x))
    assert actual == expected


@pytest.mark.parametrize("name, kwargs, shape, buffer", [
    ("BatchNorm2d", {}, (2, 32, 4, 5), "running_mean"),
    ("BatchNorm1d", {"track_running_stats": False}, (2, 32), "weight"),
])
def test_a_wrong_channel_count_says_expected_64_got_32_with_torchs_exception_type(
        name, kwargs, shape, buffer):
    x = torch.randn(shape)
    expected_type, torch_message = _raised(lambda: getattr(nn, name)(64, **kwargs),
                                           lambda m: m(x))
    actual_type, message = _raised(lambda: getattr(batchnorm, name)(64, **kwargs),
                                   lambda m: m(x))
    assert torch_message == f"{buffer} should contain 32 elements not 64"  # backwards
    assert actual_type is expected_type
    assert message == (f"expected input with 64 channels (the size of {buffer}), got input "
                       "with 32 channels")


def test_group_norm_constructor_rejects_indivisible_channels_like_torch():
    with pytest.raises(ValueError) as expected:
        nn.GroupNorm(3, 4)
    with pytest.raises(ValueError) as actual:
        batchnorm.GroupNorm(3, 4)
    assert str(actual.value) == str(expected.value)


def test_eval_with_zero_eps_is_allowed_like_torch():
    x = torch.randn(4, 3)
    reference, ours = nn.BatchNorm1d(3, eps=0.0).eval(), batchnorm.BatchNorm1d(3, eps=0.0).eval()
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_non_finite_input_is_an_error_and_leaves_running_statistics_untouched():
    layer = batchnorm.BatchNorm1d(3)
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))


@pytest.mark.parametrize("axis", [3, -4])
def test_generic_batch_norm_names_axis_and_rank_when_input_is_too_small(axis):
    layer = batchnorm.BatchNorm(4, axis=axis)
    with pytest.raises(ValueError, match=rf"expected at least 4D input for axis={axis} "
                       r"\(got 3D input\)"):
        layer(torch.randn(2, 4, 4))
