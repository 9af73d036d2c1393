"""kernels.select: the BATCHNORM_BACKEND switch, the default rule, and the functional layer
running on the Numba kernels end to end (outputs, gradients, running statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm.functional as bf
from batchnorm import kernels
from batchnorm.core.activation import Activation
from batchnorm.core.layout import channel_view
from batchnorm.core.spec import NormSpec
from batchnorm.kernels import numba_cpu, reference


def spec_for(x: torch.Tensor) -> tuple[torch.Tensor, NormSpec]:
    view = channel_view(x, 1)
    return view.x, NormSpec(view.reduce_dims, view.param_shape, 1e-5)


def assert_matches_float64(y, y64, dy, leaves, leaves64, grad_atol: float = 2e-5) -> None:
    """Backpropagate dy through ours and the float64 reference; the output within 2e-5 and
    every leaf's gradient within 2e-5 relative + ``grad_atol``."""
    (y * dy).sum().backward()
    (y64 * dy.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64.detach(), rtol=0, atol=2e-5)
    for ours, ref in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=2e-5, atol=grad_atol)


@pytest.mark.parametrize("shape,expected", [
    ((64, 32, 16, 16), numba_cpu),
    ((4, 3, 5), reference),
])
def test_default_dispatch_follows_the_size_rule(monkeypatch, shape, expected):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    view_x, spec = spec_for(torch.randn(shape))
    assert kernels.select(view_x, spec) is expected


@pytest.mark.parametrize("backend,expected", [("torch", reference), ("numba", numba_cpu),
                                              (" NUMBA ", numba_cpu)])
def test_backend_variable_forces_the_backend(monkeypatch, backend, expected):
    monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    for shape in ((64, 32, 16, 16), (4, 3, 5)):
        view_x, spec = spec_for(torch.randn(shape))
        assert kernels.select(view_x, spec) is expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_forced_numba_falls_back_to_reference_for_other_dtypes(monkeypatch, dtype):
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    view_x, spec = spec_for(torch.randn(64, 32, 16, 16, dtype=dtype))
    assert kernels.select(view_x, spec) is reference


def test_forced_numba_falls_back_to_reference_for_ghost_views(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    x = torch.randn(8, 4, 6, 10)  # (chunks, P / chunks, C, Q): reduced over (1, 3)
    spec = NormSpec((1, 3), (1, 1, 6, 1), 1e-5)
    assert numba_cpu.supports(x, spec)  # the segments layout covers it
    channels_last_ghost = NormSpec((1,), (1, 1, 10), 1e-5)
    assert not numba_cpu.supports(x[0], channels_last_ghost)
    assert kernels.select(x[0], channels_last_ghost) is reference


def test_unknown_backend_is_rejected_with_the_variable_name(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "cuda")
    view_x, spec = spec_for(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"BATCHNORM_BACKEND must be one of .*'cuda'"):
        kernels.select(view_x, spec)


def test_kernels_run_inside_batch_norm_when_forced(monkeypatch):
    calls = []
    original = numba_cpu.normalize

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(numba_cpu, "normalize", spy)
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    bf.batch_norm(torch.randn(4, 3, 5), None, None, training=True)
    assert calls == [torch.Size([4, 3, 5])]
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    bf.batch_norm(torch.randn(4, 3, 5), None, None, training=True)
    assert len(calls) == 1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_training_steps_match_torch_in_float64(monkeypatch, memory_format):
    """Three training steps then eval: outputs and gradients within 2e-5 of torch's float64
    batch_norm, running statistics within 1e-6 + 2e-6 relative (float32 rounding of values
    around 2-4 over four updates)."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    channels = 6
    ours_stats = [torch.zeros(channels), torch.ones(channels)]
    ref_stats = [torch.zeros(channels, dtype=torch.float64),
                 torch.ones(channels, dtype=torch.float64)]
    weight, bias = torch.randn(channels), torch.randn(channels)
    for step in range(4):
        training = step < 3
        x = (torch.randn(5, channels, 7, 9) * 2 + 1).contiguous(memory_format=memory_format)
        dy = torch.randn(5, channels, 7, 9)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
        y = bf.batch_norm(leaves[0], *ours_stats, leaves[1], leaves[2], training=training,
                          momentum=0.2)
        y64 = F.batch_norm(leaves64[0], *ref_stats, leaves64[1], leaves64[2],
                           training=training, momentum=0.2)
        assert_matches_float64(y, y64, dy, leaves, leaves64)
        for ours, ref in zip(ours_stats, ref_stats, strict=True):
            torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["layer_norm", "group_norm", "instance_norm"])
def test_row_normalizations_match_torch_in_float64(monkeypatch, case):
    """Outputs and input/parameter gradients within 2e-5 of torch.nn.functional in float64."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    x = torch.randn(4, 8, 6, 5) * 3 + 2
    shape = (6, 5) if case == "layer_norm" else (8,)
    weight, bias = torch.randn(shape), torch.randn(shape)
    calls = {
        "layer_norm": lambda f, *t: f.layer_norm(t[0], shape, t[1], t[2]),
        "group_norm": lambda f, *t: f.group_norm(t[0], 2, t[1], t[2]),
        "instance_norm": lambda f, *t: f.instance_norm(t[0], weight=t[1], bias=t[2]),
    }
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    y, y64 = calls[case](bf, *leaves), calls[case](F, *leaves64)
    assert_matches_float64(y, y64, torch.randn_like(y), leaves, leaves64)


@pytest.mark.parametrize("name,param", [("relu", None), ("leaky_relu", 0.1), ("elu", 0.5),
                                        ("silu", None)])
def test_fused_activation_gradients_match_unfused_float64(monkeypatch, name, param):
    """The kernels' recomputed act'(z) against autograd through torch's own activation."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    act = Activation(name, 0.0 if param is None else param)
    x, weight, bias = torch.randn(6, 5, 40), torch.randn(5), torch.randn(5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    y = bf.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True,
                      activation=name, activation_param=param)
    z64 = F.batch_norm(leaves64[0], None, None, leaves64[1], leaves64[2], training=True)
    y64 = {"relu": torch.relu, "silu": F.silu,
           "leaky_relu": lambda t: F.leaky_relu(t, act.param),
           "elu": lambda t: F.elu(t, act.param)}[name](z64)
    assert_matches_float64(y, y64, torch.randn_like(y), leaves, leaves64, grad_atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_working_with_numba_forced(monkeypatch, dtype):
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    x = torch.randn(8, 4, 10, dtype=dtype, requires_grad=True)
    y = bf.batch_norm(x, None, None, training=True)
    y.float().sum().backward()
    expected = F.batch_norm(x.detach().float(), None, None, training=True)
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=1e-2)


def test_per_sample_norms_take_the_fused_kernels_and_batch_norm_does_not(monkeypatch):
    """Statistics per row (LayerNorm) or per sample and group (GroupNorm, InstanceNorm) run
    forward and backward in one kernel call each; batch statistics keep the separate
    statistics and normalize calls. Running statistics need the separate statistics call,
    but the backward of such a view is still one call."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    calls = []
    for name in ("forward_batch", "backward_batch"):
        original = getattr(numba_cpu, name)
        monkeypatch.setattr(numba_cpu, name,
                            lambda *args, _name=name, _f=original: calls.append(_name)
                            or _f(*args))
    x = torch.randn(16, 8, 32, requires_grad=True)
    bf.layer_norm(x, (32,), torch.ones(32), torch.zeros(32)).sum().backward()
    bf.group_norm(x, 2).sum().backward()
    bf.instance_norm(x).sum().backward()
    assert calls == ["forward_batch", "backward_batch"] * 3
    bf.batch_norm(x, None, None, training=True).sum().backward()
    assert len(calls) == 6
    bf.instance_norm(x, torch.zeros(8), torch.ones(8)).sum().backward()
    assert calls[6:] == ["backward_batch"]
