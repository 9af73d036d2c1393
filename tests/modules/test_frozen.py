"""Frozen BatchNorm and freeze/unfreeze: eval-mode torch.nn.BatchNorm* in every mode, no
updates, dx = dy * scale, the state kept through a freeze/unfreeze round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.modules.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    unfreeze,
)

TOL = {"atol": 1e-12, "rtol": 1e-12}  # float64 against float64: only rounding differs


def _trained(layer, generator, shape):
    """A layer with non-trivial affine and running statistics."""
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.uniform_(-1, 1, generator=generator)
    layer.train()
    for _ in range(2):
        layer(torch.randn(shape, dtype=layer.weight.dtype, generator=generator) * 3 + 1)
    return layer


CASES = [
    (nn.BatchNorm1d, FrozenBatchNorm1d, (6, 3), None),
    (nn.BatchNorm1d, FrozenBatchNorm1d, (6, 3, 4), None),
    (nn.BatchNorm2d, FrozenBatchNorm2d, (4, 3, 4, 5), torch.channels_last),
    (nn.BatchNorm3d, FrozenBatchNorm3d, (2, 3, 2, 3, 4), None),
]


@pytest.mark.parametrize(("torch_cls", "frozen_cls", "shape", "memory_format"), CASES)
def test_frozen_matches_eval_mode_torch_batchnorm_in_train_mode_too(
        torch_cls, frozen_cls, shape, memory_format):
    generator = torch.Generator().manual_seed(0)
    plain = _trained(torch_cls(3, dtype=torch.float64), generator, shape).eval()
    frozen = frozen_cls(3, dtype=torch.float64)
    frozen.load_state_dict(plain.state_dict())  # num_batches_tracked is ignored
    frozen.train()
    before = {name: buffer.clone() for name, buffer in frozen.named_buffers()}
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = frozen(x1), plain(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    dy = torch.randn(shape, dtype=torch.float64, generator=generator)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for name, buffer in frozen.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0)
    assert list(frozen.parameters()) == []


def test_frozen_backward_is_dy_times_scale():
    frozen = FrozenBatchNorm2d(2, eps=0.0, dtype=torch.float64)
    frozen.weight.copy_(torch.tensor([2.0, -3.0]))
    frozen.running_var.copy_(torch.tensor([4.0, 9.0]))
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    frozen(x).backward(dy)
    torch.testing.assert_close(x.grad, dy * torch.tensor([1.0, -1.0],
                                                         dtype=torch.float64).view(1, 2, 1, 1))


def test_frozen_generic_axis_matches_channels_last_batchnorm():
    generator = torch.Generator().manual_seed(1)
    ours = _trained(batchnorm.BatchNorm(3, axis=-1, dtype=torch.float64), generator,
                    (4, 5, 3)).eval()
    frozen = freeze(ours)
    assert type(frozen) is FrozenBatchNorm and frozen.axis == -1
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(frozen(x), ours(x), **TOL)


def test_freeze_keeps_fused_activation():
    generator = torch.Generator().manual_seed(2)
    ours = _trained(batchnorm.BatchNorm2d(3, activation="elu", activation_param=0.5,
                                          dtype=torch.float64), generator, (4, 3, 2, 2))
    ours.eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(freeze(ours)(x), ours(x), **TOL)


def test_freeze_and_unfreeze_recurse_and_keep_values_mode_and_options():
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        _trained(nn.BatchNorm2d(4), generator, (5, 4, 2, 2)),
        nn.Sequential(_trained(batchnorm.BatchNorm1d(4, ghost_batch_size=2, renorm=True,
                                                     activation="relu", momentum=0.3),
                               generator, (6, 4))),
    )
    model[1].weight.requires_grad_(False)
    model[2][0].eval()
    originals = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(5, 3, 2, 2, generator=generator)
    model.eval()
    expected = model[1](model[0](x))
    model.train()
    model[2][0].eval()

    assert freeze(model) is model
    assert type(model[1]) is FrozenBatchNorm2d and type(model[2][0]) is FrozenBatchNorm1d
    assert model[1].training and not model[2][0].training
    torch.testing.assert_close(model[1](model[0](x)), expected)
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias"]

    unfreeze(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is batchnorm.BatchNorm1d
    assert model[1].training and not model[2][0].training
    inner = model[2][0]
    assert (inner.momentum, inner.ghost_batch_size, inner.renorm, inner.activation) == \
        (0.3, 2, True, "relu")
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, originals[name], rtol=0, atol=0)


def test_unfreeze_takes_values_loaded_into_the_frozen_model():
    model = freeze(nn.Sequential(nn.BatchNorm2d(3)))
    model.load_state_dict({"0.weight": torch.full((3,), 2.0), "0.bias": torch.zeros(3),
                           "0.running_mean": torch.ones(3), "0.running_var": torch.ones(3)})
    layer = unfreeze(model)[0]
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(layer.running_mean, torch.ones(3))


def test_unfreeze_of_a_directly_built_frozen_layer_gives_our_batchnorm():
    frozen = FrozenBatchNorm3d(4, eps=1e-3, activation="silu")
    frozen.running_var.fill_(2.0)
    layer = unfreeze(frozen)
    assert type(layer) is batchnorm.BatchNorm3d
    assert (layer.eps, layer.activation) == (1e-3, "silu")
    torch.testing.assert_close(layer.running_var, torch.full((4,), 2.0))


def test_freeze_of_affine_free_layer_uses_unit_scale_and_unfreezes_without_parameters():
    plain = _trained(nn.BatchNorm1d(3, affine=True), torch.Generator().manual_seed(4), (6, 3))
    bare = nn.BatchNorm1d(3, affine=False)
    bare.load_state_dict({k: v for k, v in plain.state_dict().items()
                          if k.startswith(("running", "num"))})
    frozen = freeze(bare)
    torch.testing.assert_close(frozen.weight, torch.ones(3))
    x = torch.randn(4, 3)
    torch.testing.assert_close(frozen(x), bare.eval()(x))
    assert unfreeze(frozen).weight is None


def test_requires_grad_false_does_not_freeze_a_batchnorms_statistics():
    """Why FrozenBatchNorm exists: a train-mode BN with frozen parameters still normalizes
    with batch statistics and moves its running statistics."""
    layer = batchnorm.BatchNorm2d(3)
    layer.requires_grad_(False)
    layer(torch.randn(4, 3, 2, 2) + 5)
    assert (layer.running_mean > 0.1).all()


def test_freeze_rejects_layers_without_running_statistics_or_shape():
    with pytest.raises(ValueError, match=r"'module' \(BatchNorm2d\) has track_running_stats"
                                         r"=False; expected running statistics"):
        freeze(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1' is an uninitialized LazyBatchNorm1d"):
        freeze(nn.Sequential(nn.Linear(2, 2), nn.LazyBatchNorm1d()))


@pytest.mark.parametrize(("frozen", "shape", "match"), [
    (FrozenBatchNorm1d(3), (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
    (FrozenBatchNorm2d(3), (2, 3, 4), r"expected 4D input \(got 3D input\)"),
    (FrozenBatchNorm3d(3), (2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
    (FrozenBatchNorm(3, axis=2), (2, 3), r"expected at least 3D input for axis=2"),
    (FrozenBatchNorm2d(3), (2, 4, 2, 2),
     r"expected input with 3 channels on axis 1, got input of size \[2, 4, 2, 2\]"),
])
def test_frozen_bad_input_raises_naming_expected_and_actual(frozen, shape, match):
    with pytest.raises(ValueError, match=match):
        frozen(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_keeps_half_precision_input_dtype(dtype):
    frozen = FrozenBatchNorm2d(3)
    frozen.running_var.fill_(4.0)
    x = torch.randn(2, 3, 2, 2).to(dtype)
    y = frozen(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() / (4.0 + 1e-5) ** 0.5, atol=1e-2,
                               rtol=1e-2)
