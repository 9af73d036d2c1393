"""Batch Renormalization on the torch-style layers, against a float64 reference written
from the paper (Ioffe 2017, Algorithm 1) with torch's running-statistics convention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import functional as F

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: only rounding differs


def renorm_reference(x, mean_ref, var_ref, weight, bias, eps, clipping, axis=1):
    """y = gamma * (x_hat * r + d) + beta, r and d from the given statistics, no gradient."""
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = -1
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    sigma_batch = torch.sqrt(var + eps)
    sigma = torch.sqrt(var_ref.view(shape) + eps)
    r = (sigma_batch / sigma).detach().clamp(clipping.get("rmin", 0.0),
                                             clipping.get("rmax", math.inf))
    dmax = clipping.get("dmax", math.inf)
    d = ((mean - mean_ref.view(shape)) / sigma).detach().clamp(-dmax, dmax)
    y = (x - mean) / sigma_batch * r + d
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y, r, d


def running_update(running, batch, momentum):
    return (1 - momentum) * running + momentum * batch


def batch_stats(x, axis=1):
    dims = [d for d in range(x.dim()) if d != axis]
    return x.mean(dims), x.var(dims, unbiased=True)


LAYERS = [
    (batchnorm.BatchNorm1d, (12, 3), False),
    (batchnorm.BatchNorm1d, (12, 3, 5), False),
    (batchnorm.BatchNorm2d, (6, 3, 4, 5), False),
    (batchnorm.BatchNorm2d, (6, 3, 4, 5), True),
    (batchnorm.BatchNorm3d, (4, 3, 2, 3, 4), False),
    (batchnorm.BatchNorm3d, (4, 3, 2, 3, 4), True),
]


def _input(shape, channels_last, generator, scale=3.0, shift=2.0):
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4
                 else torch.channels_last_3d)
    return x.requires_grad_()


@pytest.mark.parametrize(("cls", "shape", "channels_last"), LAYERS)
def test_renorm_matches_paper_reference_over_steps_then_eval(cls, shape, channels_last):
    generator = torch.Generator().manual_seed(0)
    clipping = {"rmax": 1.5, "rmin": 0.8, "dmax": 0.5}
    layer = cls(3, renorm=True, renorm_clipping=clipping, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.uniform_(-1, 1, generator=generator)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    clipped = False
    for _ in range(4):
        x = _input(shape, channels_last, generator)
        x_ref = x.detach().clone().requires_grad_()
        y = layer(x)
        y_ref, r, d = renorm_reference(x_ref, running_mean, running_var, weight, bias,
                                       layer.eps, clipping)
        clipped |= bool((r == 1.5).any() or (r == 0.8).any() or (d.abs() == 0.5).any())
        torch.testing.assert_close(y, y_ref, **TOL)
        dy = torch.randn(shape, dtype=torch.float64, generator=generator)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        torch.testing.assert_close(layer.weight.grad, weight.grad, **TOL)
        torch.testing.assert_close(layer.bias.grad, bias.grad, **TOL)
        for grad in (layer.weight.grad, layer.bias.grad, weight.grad, bias.grad):
            grad.zero_()
        mean, var = batch_stats(x_ref.detach())
        running_mean = running_update(running_mean, mean, layer.momentum)
        running_var = running_update(running_var, var, layer.momentum)
        torch.testing.assert_close(layer.running_mean, running_mean, **TOL)
        torch.testing.assert_close(layer.running_var, running_var, **TOL)
    assert clipped, "the clipping never bound: the test would not see a wrong clip"
    layer.eval()
    x = _input(shape, channels_last, generator)
    expected = nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False,
                                        eps=layer.eps)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_renorm_with_identity_clipping_is_plain_batchnorm():
    generator = torch.Generator().manual_seed(1)
    ours = batchnorm.BatchNorm2d(4, renorm=True, dtype=torch.float64,
                                 renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0})
    plain = nn.BatchNorm2d(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=generator) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn_like(x)
        ours(x1).backward(dy)
        plain(x2).backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        torch.testing.assert_close(ours.weight.grad, plain.weight.grad, **TOL)
    torch.testing.assert_close(ours.running_var, plain.running_var, **TOL)


def test_renorm_without_affine_matches_reference():
    generator = torch.Generator().manual_seed(2)
    layer = batchnorm.BatchNorm1d(3, affine=False, renorm=True, dtype=torch.float64)
    layer.running_mean.fill_(0.5)
    layer.running_var.fill_(4.0)
    x = _input((8, 3), False, generator)
    x_ref = x.detach().clone().requires_grad_()
    y_ref, _, _ = renorm_reference(x_ref, torch.full((3,), 0.5, dtype=torch.float64),
                                   torch.full((3,), 4.0, dtype=torch.float64), None, None,
                                   layer.eps, {})
    y = layer(x)
    torch.testing.assert_close(y, y_ref, **TOL)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)


def test_renorm_clipping_schedule_is_called_with_the_step_and_applied():
    generator = torch.Generator().manual_seed(3)
    steps = []

    def schedule(step):
        steps.append(step)
        return {"rmax": 1.0 + step / 4, "rmin": 1.0 / (1.0 + step / 4), "dmax": step / 8}

    layer = batchnorm.BatchNorm1d(3, renorm=True, renorm_clipping=schedule,
                                  dtype=torch.float64)
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    for step in range(3):
        x = _input((10, 3), False, generator)
        y_ref, _, _ = renorm_reference(x.detach(), running_mean, running_var,
                                       layer.weight.detach(), layer.bias.detach(), layer.eps,
                                       schedule(step))
        torch.testing.assert_close(layer(x), y_ref, **TOL)
        mean, var = batch_stats(x.detach())
        running_mean = running_update(running_mean, mean, layer.momentum)
        running_var = running_update(running_var, var, layer.momentum)
    assert steps == [0, 0, 1, 1, 2, 2]  # reference and layer call it once per step each
    layer.eval()
    layer(_input((10, 3), False, generator))
    assert len(steps) == 6, "eval mode is plain BN and must not consult the schedule"


def test_renorm_momentum_keeps_own_statistics_for_r_and_d():
    generator = torch.Generator().manual_seed(4)
    layer = batchnorm.BatchNorm1d(3, renorm=True, renorm_momentum=0.5, dtype=torch.float64)
    renorm_mean, renorm_var = layer.running_mean.clone(), layer.running_var.clone()
    running_mean, running_var = renorm_mean.clone(), renorm_var.clone()
    for _ in range(3):
        x = _input((9, 3), False, generator)
        y_ref, _, _ = renorm_reference(x.detach(), renorm_mean, renorm_var,
                                       layer.weight.detach(), layer.bias.detach(), layer.eps,
                                       {})
        torch.testing.assert_close(layer(x), y_ref, **TOL)
        mean, var = batch_stats(x.detach())
        renorm_mean, renorm_var = (running_update(renorm_mean, mean, 0.5),
                                   running_update(renorm_var, var, 0.5))
        running_mean, running_var = (running_update(running_mean, mean, 0.1),
                                     running_update(running_var, var, 0.1))
    torch.testing.assert_close(layer.renorm_mean, renorm_mean, **TOL)
    torch.testing.assert_close(layer.renorm_var, renorm_var, **TOL)
    torch.testing.assert_close(layer.running_mean, running_mean, **TOL)
    torch.testing.assert_close(layer.running_var, running_var, **TOL)


def test_renorm_gradcheck_float64_where_r_and_d_are_clipped_constants():
    """r and d carry no gradient by definition, so finite differences agree with the
    analytic gradient only where clipping holds them constant: r = 2, d = -+1 here."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()
    bias = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()
    running_mean = torch.tensor([5.0, -5.0], dtype=torch.float64)
    running_var = torch.tensor([0.01, 0.01], dtype=torch.float64)

    def fn(x, weight, bias):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, True,
                            renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0},
                            activation="elu")

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_renorm_in_half_precision_stays_finite_and_close(dtype):
    generator = torch.Generator().manual_seed(6)
    layer = batchnorm.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 3, "dmax": 5})
    reference = batchnorm.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 3, "dmax": 5},
                                      dtype=torch.float64)
    layer.to(dtype)
    for _ in range(3):
        # |x| ~ 1e3: x**2 overflows float16 (max 65504), so half-precision sums would not do
        x = torch.randn(8, 3, 4, 4, generator=generator) * 100 + 1000
        x_half = x.to(dtype).requires_grad_()
        y = layer(x_half)
        y.float().square().sum().backward()
        expected = reference(x_half.detach().double())
        assert torch.isfinite(y).all() and torch.isfinite(x_half.grad).all()
        assert torch.isfinite(layer.weight.grad).all()
        torch.testing.assert_close(y.double(), expected, atol=0.05, rtol=0.02)
    assert torch.isfinite(layer.running_var).all()


def test_running_variance_beyond_a_float16_buffer_raises_instead_of_storing_inf():
    layer = batchnorm.BatchNorm2d(3, renorm=True).half()
    x = (torch.randn(8, 3, 4, 4) * 1000).half()
    with pytest.raises(ValueError, match=r"running_var overflows its torch.float16 buffer"):
        layer(x)
    assert torch.isfinite(layer.running_var).all()


def test_renorm_under_cpu_autocast_bfloat16_is_finite_and_close_to_float32():
    generator = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(3, 4, 3)
    layer = batchnorm.BatchNorm2d(4, renorm=True, renorm_clipping={"rmax": 2, "dmax": 2})
    reference = batchnorm.BatchNorm2d(4, renorm=True, renorm_clipping={"rmax": 2, "dmax": 2})
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=generator) * 50
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = conv(x)
            y = layer(hidden)
        assert hidden.dtype == torch.bfloat16
        y.float().sum().backward()
        expected = reference(hidden.detach().float())
        assert torch.isfinite(y).all() and torch.isfinite(conv.weight.grad).all()
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.running_mean, reference.running_mean)


def test_renorm_state_dict_is_the_plain_layers_and_loads_both_ways():
    ours = batchnorm.BatchNorm2d(4, renorm=True)
    plain = nn.BatchNorm2d(4)
    plain.running_mean.fill_(0.5)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    plain.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours.running_mean, plain.running_mean)


def test_renorm_momentum_buffers_start_from_a_plain_checkpoints_running_stats():
    plain = nn.BatchNorm2d(4)
    plain.running_mean.fill_(0.5)
    plain.running_var.fill_(3.0)
    ours = batchnorm.BatchNorm2d(4, renorm=True, renorm_momentum=0.01)
    ours.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ours.renorm_mean, plain.running_mean)
    torch.testing.assert_close(ours.renorm_var, plain.running_var)
    assert {"renorm_mean", "renorm_var"} <= set(ours.state_dict())


def test_lazy_renorm_momentum_buffers_copy_the_initialized_running_stats():
    layer = batchnorm.LazyBatchNorm2d(renorm=True, renorm_momentum=0.5)
    layer.eval()
    layer(torch.randn(2, 3, 4, 4))
    assert type(layer) is batchnorm.BatchNorm2d
    torch.testing.assert_close(layer.renorm_mean, torch.zeros(3))
    torch.testing.assert_close(layer.renorm_var, torch.ones(3))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"renorm": True, "renorm_clipping": {"rmax": 2, "bogus": 1}},
     r"renorm_clipping keys must be among .* got \['bogus'\]"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.5}},
     r"0 <= rmin <= 1 <= rmax, got rmin=0.0, rmax=0.5"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1}}, r"dmax must be >= 0, got -1.0"),
    ({"renorm_clipping": {"rmax": 2}}, r"renorm_clipping and renorm_momentum need renorm"),
    ({"renorm": True, "renorm_momentum": 1.5}, r"renorm_momentum must be in \(0, 1\], got 1.5"),
    ({"renorm": True, "track_running_stats": False},
     r"renorm=True needs running statistics .* track_running_stats=False"),
])
def test_renorm_bad_options_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batchnorm.BatchNorm2d(4, **kwargs)


def test_renorm_schedule_returning_bad_limits_raises_at_forward():
    layer = batchnorm.BatchNorm1d(3, renorm=True, renorm_clipping=lambda step: {"rmin": 2})
    with pytest.raises(ValueError, match=r"rmin=2\.0"):
        layer(torch.randn(4, 3))


def test_functional_renorm_without_statistics_to_measure_against_raises():
    with pytest.raises(ValueError, match="renorm=True measures r and d against running_mean"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, renorm=True)
