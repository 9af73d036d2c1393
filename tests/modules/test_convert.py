"""convert/revert swap layers in place, sharing tensors and keeping train/eval mode;
the generic BatchNorm(axis) normalizes any axis without a transpose."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)),
        nn.Flatten(), nn.LazyBatchNorm1d(), nn.LayerNorm(4 * 6 * 6),
    )


def test_convert_swaps_every_norm_layer_sharing_parameters_and_buffers():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(5, 3, 8, 8)
    model(x)  # initializes the lazy layer
    model.eval()
    tensors = {name: t.data_ptr() for name, t in model.state_dict().items()}
    expected = model(x)
    batchnorm.convert(model)
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)}
    assert kinds == {"batchnorm"}
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == tensors
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # float32 sums


def test_revert_restores_torch_classes_and_training_updates_shared_buffers():
    model = _model()
    model(torch.randn(5, 3, 8, 8))
    original = model[1].running_mean
    batchnorm.convert(model)
    model(torch.randn(5, 3, 8, 8))
    assert model[1].running_mean is original
    assert model[1].num_batches_tracked.item() == 2
    batchnorm.revert(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d
    assert model[1].running_mean is original and model.training


def test_convert_of_an_uninitialized_lazy_layer_initializes_the_new_layer():
    layer = batchnorm.convert(nn.LazyBatchNorm2d(momentum=0.3))
    assert type(layer) is batchnorm.LazyBatchNorm2d
    layer(torch.randn(2, 5, 3, 3))
    assert type(layer) is batchnorm.BatchNorm2d and layer.num_features == 5
    assert layer.momentum == 0.3


def test_optimizer_built_before_convert_still_trains_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert(model)
    before = model[1].weight.detach().clone()
    model(torch.randn(5, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)


@pytest.mark.parametrize("shape", [(6, 5, 4), (3, 2, 4, 5), (2, 3, 2, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_on_last_axis_equals_permuted_torch_batch_norm(shape, dtype):
    """axis=-1 (TF layout) against torch's BatchNorm on the moved axis over three steps."""
    channels = shape[-1]
    ours = batchnorm.BatchNorm(channels, axis=-1, dtype=dtype)
    reference = nn.BatchNorm1d(channels, dtype=dtype)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]  # summation order only
    for training in (True, True, True, False):
        ours.train(training)
        reference.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 + 3
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(a)
        y_ref = reference(b.reshape(-1, channels)).reshape(shape)
        torch.testing.assert_close(y, y_ref, rtol=tolerance, atol=tolerance)
        grad = torch.randn(shape, dtype=dtype)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, rtol=tolerance, atol=tolerance)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=tolerance,
                                       atol=tolerance)


def test_batch_norm_on_a_middle_axis_matches_moving_that_axis_to_dim_1():
    x = torch.randn(4, 5, 3, 6, dtype=torch.float64)
    ours = batchnorm.BatchNorm(3, axis=2, dtype=torch.float64)
    reference = nn.BatchNorm2d(3, dtype=torch.float64)
    expected = reference(x.movedim(2, 1)).movedim(1, 2)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-12, atol=0)
