"""Fused activation on BatchNorm*: exactly act(torch.nn.BatchNorm*(x)), same state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import functional as F

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: only rounding differs

ACTIVATIONS = [
    ("relu", None, lambda z: nn.functional.relu(z)),
    ("relu6", None, lambda z: nn.functional.relu6(z)),
    ("leaky_relu", None, lambda z: nn.functional.leaky_relu(z, 0.01)),
    ("leaky_relu", 0.2, lambda z: nn.functional.leaky_relu(z, 0.2)),
    ("elu", None, lambda z: nn.functional.elu(z, 1.0)),
    ("elu", 0.5, lambda z: nn.functional.elu(z, 0.5)),
    ("silu", None, lambda z: nn.functional.silu(z)),
]
LAYERS = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (8, 3, 5), None),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 3, 4, 5), torch.channels_last),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (3, 3, 2, 3, 4), None),
]


@pytest.mark.parametrize(("name", "param", "act"), ACTIVATIONS)
@pytest.mark.parametrize(("cls", "torch_cls", "shape", "memory_format"), LAYERS)
def test_fused_activation_matches_torch_batchnorm_then_activation(
        name, param, act, cls, torch_cls, shape, memory_format):
    generator = torch.Generator().manual_seed(0)
    ours = cls(3, activation=name, activation_param=param, dtype=torch.float64)
    plain = torch_cls(3, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.uniform_(-4, 4, generator=generator)  # past relu6's upper kink
        plain.bias.uniform_(-1, 1, generator=generator)
    ours.load_state_dict(plain.state_dict())
    for training in (True, True, False):
        ours.train(training)
        plain.train(training)
        x = torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + 0.5
        if memory_format is not None:
            x = x.to(memory_format=memory_format)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), act(plain(x2))
        torch.testing.assert_close(y1, y2, **TOL)
        dy = torch.randn(shape, dtype=torch.float64, generator=generator)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        torch.testing.assert_close(ours.weight.grad, plain.weight.grad, **TOL)
        torch.testing.assert_close(ours.bias.grad, plain.bias.grad, **TOL)
        torch.testing.assert_close(ours.running_mean, plain.running_mean, **TOL)
        torch.testing.assert_close(ours.running_var, plain.running_var, **TOL)


@pytest.mark.parametrize(("name", "param"), [("leaky_relu", 0.1), ("elu", 0.7), ("silu", None)])
def test_fused_activation_gradcheck_float64(name, param):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()
    bias = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()

    def fn(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, True, activation=name,
                            activation_param=param)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_fused_activation_state_dict_loads_both_ways_with_the_plain_layer():
    ours = batchnorm.BatchNorm2d(4, activation="silu")
    plain = nn.BatchNorm2d(4)
    with torch.no_grad():
        plain.running_mean.fill_(0.25)
        ours.weight.fill_(2.0)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    plain.load_state_dict(ours.state_dict())
    torch.testing.assert_close(plain.weight, ours.weight)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"activation": "gelu"}, r"activation must be one of .* got 'gelu'"),
    ({"activation": "relu", "activation_param": 0.1},
     r"activation_param is only used by leaky_relu and elu, got 0.1 for activation 'relu'"),
])
def test_fused_activation_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batchnorm.BatchNorm2d(4, **kwargs)
