"""torch's error contract and the all-or-nothing training step: a rejected batch changes
no buffer; unsupported dtypes, buffers that require grad and mismatched parameter dtypes
raise like torch; meta tensors and empty channel dims work like torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

LAYERS = {
    "batch_norm": lambda: batchnorm.BatchNorm1d(2, momentum=None),
    "ghost": lambda: batchnorm.BatchNorm1d(2, momentum=None, ghost_batch_size=2),
    "renorm": lambda: batchnorm.BatchNorm1d(2, momentum=None, renorm=True,
                                            renorm_momentum=0.5),
    "instance_norm": lambda: batchnorm.InstanceNorm1d(2, momentum=0.5,
                                                      track_running_stats=True),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_a_rejected_batch_changes_no_buffer_at_all(make):
    """After one rejected and one good batch, every buffer equals that of a layer that
    only saw the good batch (with momentum=None the count decides the average)."""
    layer, fresh = make(), make()
    good = torch.tensor([[1.0, 5.0], [1.5, 4.0], [0.5, 6.0], [1.0, 5.0]]).unsqueeze(-1)
    good = good.expand(4, 2, 3).contiguous() + torch.linspace(0, 0.1, 3)
    bad = good.clone()
    bad[1, 0, 0] = float("nan")
    if isinstance(layer, nn.BatchNorm1d):
        good, bad = good[..., 0], bad[..., 0]
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or infinity"):
        layer(bad)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    layer(good)
    fresh(good)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, msg=name)


def test_cumulative_average_after_a_rejected_batch_is_the_good_batch_mean():
    layer = batchnorm.BatchNorm1d(2, momentum=None)
    with pytest.raises(ValueError):
        layer(torch.tensor([[float("inf"), 1.0], [0.0, 2.0]]))
    layer(torch.tensor([[0.0, 4.0], [2.0, 6.0]]))
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0, 5.0]))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.uint8])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm1d", "GroupNorm", "LayerNorm"])
def test_non_float_input_is_rejected_naming_the_dtype(name, training, dtype):
    args = {"GroupNorm": (1, 4), "LayerNorm": (5,)}.get(name, (4,))
    layer = getattr(batchnorm, name)(*args).train(training)
    x = (torch.randn(3, 4, 5) * 3).to(dtype)
    with pytest.raises(RuntimeError, match=str(dtype)):
        layer(x)


def test_float64_input_into_a_float32_layer_is_rejected_naming_both_dtypes():
    with pytest.raises(RuntimeError, match=r"weight has dtype torch.float32 but input has "
                                           r"dtype torch.float64"):
        batchnorm.BatchNorm1d(3)(torch.randn(4, 3, dtype=torch.float64))


def test_half_input_with_float32_parameters_is_mixed_precision_like_torch():
    x = torch.randn(4, 3, 5).to(torch.bfloat16)
    ours, reference = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference(x), rtol=0.02, atol=0.02)


def test_running_statistics_that_require_grad_are_refused_in_training():
    running_mean = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="running_mean must not require grad"):
        batchnorm.functional.batch_norm(torch.randn(4, 3), running_mean, torch.ones(3),
                                        training=True)


@pytest.mark.parametrize("make,shape", [
    (lambda: batchnorm.BatchNorm2d(3, device="meta"), (4, 3, 5, 5)),
    (lambda: batchnorm.InstanceNorm2d(3, track_running_stats=True, device="meta"),
     (4, 3, 5, 5)),
    (lambda: batchnorm.GroupNorm(1, 3, device="meta"), (4, 3, 5)),
    (lambda: batchnorm.LayerNorm(5, device="meta"), (4, 3, 5)),
], ids=["batch_norm", "instance_norm", "group_norm", "layer_norm"])
def test_meta_device_training_runs_like_torch(make, shape):
    layer = make().train()
    x = torch.randn(shape, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_instance_norm_with_zero_channels_returns_an_empty_tensor_like_torch():
    x = torch.randn(2, 0, 3)
    assert batchnorm.InstanceNorm1d(0)(x).shape == nn.InstanceNorm1d(0)(x).shape == (2, 0, 3)


@pytest.mark.parametrize("make", [
    lambda: batchnorm.BatchNorm1d(8), lambda: batchnorm.InstanceNorm1d(8),
    lambda: batchnorm.GroupNorm(2, 8), lambda: batchnorm.LayerNorm(6)],
    ids=["batch_norm", "instance_norm", "group_norm", "layer_norm"])
def test_finite_input_whose_float32_variance_overflows_says_so(make):
    """Values around 1e20 are finite, but their variance (1e40) is not in float32: the
    error names the overflow instead of calling the input NaN, and nothing returns zeros."""
    layer = make()
    x = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0)) * 1e20
    with pytest.raises(ValueError, match=r"variance overflows torch.float32: the input is "
                                         r"finite"):
        layer(x)
    if hasattr(layer, "running_var") and layer.running_var is not None:
        assert torch.equal(layer.running_var, torch.ones(8))
    torch.testing.assert_close(layer.double()(x.double()),
                               make().double()(x.double()))  # float64 still works
