"""BatchNorm + residual add + activation in one operator (``layer(x, residual)``): exactly
``act(torch.nn.BatchNorm*(x) + residual)`` on every backend, under every transform."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.kernels import reference

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: only rounding differs

ACTIVATIONS = {
    None: lambda z: z,
    "relu": nn.functional.relu,
    "leaky_relu": lambda z: nn.functional.leaky_relu(z, 0.01),
    "elu": nn.functional.elu,
    "silu": nn.functional.silu,
}
# (input layout, residual layout): the residual is read in the input's layout either way.
LAYOUTS = {"NCHW": (False, False), "channels_last": (True, True),
           "channels_last input, NCHW residual": (True, False)}


def _backend(name: str | None) -> str | None:
    """``name``, after checking that it runs here (the Triton kernels need the 'cuda' extra:
    a loud skip without it, a failure where CI requires it)."""
    if name == "triton":
        from batchnorm.kernels import triton_kernels
        if triton_kernels.IMPORT_ERROR is not None:
            reason = f"TRITON NOT INSTALLED ({triton_kernels.IMPORT_ERROR})"
            if os.environ.get("BATCHNORM_REQUIRE_TRITON") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    return name


def _draw(shape, channels_last, generator, offset=0.5):
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * 2 + offset
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_steps(ours, plain, activation, shape, layouts, steps=(True, True, False)):
    """Outputs, gradients of input, residual and parameters, and running statistics of
    ``ours(x, r)`` against ``act(plain(x) + r)`` over training steps and an eval step."""
    generator = torch.Generator().manual_seed(0)
    act = ACTIVATIONS[activation]
    for training in steps:
        ours.train(training)
        plain.train(training)
        x = _draw(shape, layouts[0], generator)
        r = _draw(shape, layouts[1], generator, offset=-0.25)
        x1, x2, r1, r2 = (t.clone().requires_grad_() for t in (x, x, r, r))
        y1, y2 = ours(x1, r1), act(plain(x2) + r2)
        torch.testing.assert_close(y1, y2, **TOL)
        dy = torch.randn(shape, dtype=torch.float64, generator=generator)
        y1.backward(dy)
        y2.backward(dy)
        for got, expected in ((x1.grad, x2.grad), (r1.grad, r2.grad),
                              (ours.weight.grad, plain.weight.grad),
                              (ours.bias.grad, plain.bias.grad),
                              (ours.running_mean, plain.running_mean),
                              (ours.running_var, plain.running_var)):
            torch.testing.assert_close(got, expected, **TOL)


def _pair(cls, torch_cls, channels, activation, **options):
    generator = torch.Generator().manual_seed(1)
    ours = cls(channels, activation=activation, dtype=torch.float64, **options)
    plain = torch_cls(channels, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.uniform_(-1.5, 1.5, generator=generator)
        plain.bias.uniform_(-1, 1, generator=generator)
    ours.load_state_dict(plain.state_dict())
    return ours, plain


@pytest.mark.parametrize("backend", [None, "torch"], ids=["default", "composite"])
@pytest.mark.parametrize("layouts", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_residual_matches_torch_batchnorm_add_activation(activation, layouts, backend):
    ours, plain = _pair(batchnorm.BatchNorm2d, nn.BatchNorm2d, 3, activation)
    with kernels.use_backend(_backend(backend)):
        _check_steps(ours, plain, activation, (4, 3, 4, 5), layouts)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="GPU PRESENT: Triton's interpreter is off where a GPU is seen; the "
                    "kernels run on CUDA tensors in test_triton_kernels.py and "
                    "test_exactness.py instead")
def test_residual_on_the_triton_kernels_matches_torch():
    """The CUDA implementation (Triton's interpreter without a GPU), both layouts."""
    with kernels.use_backend(_backend("triton")):
        assert kernels.primitives(torch.zeros(1)) is not reference
        for layouts in (LAYOUTS["NCHW"], LAYOUTS["channels_last input, NCHW residual"]):
            ours, plain = _pair(batchnorm.BatchNorm2d, nn.BatchNorm2d, 3, "relu")
            _check_steps(ours, plain, "relu", (4, 3, 2, 3), layouts, steps=(True, False))


@pytest.mark.parametrize(("cls", "torch_cls", "shape"),
                         [(batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 3)),
                          (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 3, 5)),
                          (batchnorm.BatchNorm3d, nn.BatchNorm3d, (3, 3, 2, 3, 4))])
def test_residual_in_every_rank(cls, torch_cls, shape):
    ours, plain = _pair(cls, torch_cls, 3, "elu")
    _check_steps(ours, plain, "elu", shape, (False, False))


def test_residual_with_ghost_batches_matches_the_ghost_layer_then_add():
    generator = torch.Generator().manual_seed(2)
    ours = batchnorm.BatchNorm2d(3, activation="relu", ghost_batch_size=2, dtype=torch.float64)
    ghost = batchnorm.BatchNorm2d(3, ghost_batch_size=2, dtype=torch.float64)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=generator)
    r = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(ours(x, r), torch.relu(ghost(x) + r), **TOL)
    torch.testing.assert_close(ours.running_var, ghost.running_var, **TOL)


def test_residual_gradcheck_and_gradgradcheck_float64():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(shape, dtype=torch.float64, generator=generator).requires_grad_()
               for shape in ((4, 2, 3), (4, 2, 3), (2,), (2,))]

    def fn(x, residual, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, True, activation="silu",
                            residual=residual)

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


def test_a_nan_batch_raises_and_changes_no_buffer():
    layer = batchnorm.BatchNorm2d(3, activation="relu")
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    with pytest.raises(ValueError, match="NaN or infinity"):
        layer(x, torch.randn(4, 3, 2, 2))
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


@pytest.mark.parametrize(("residual", "options", "match"), [
    (torch.zeros(4, 3, 2), {}, r"expected shape \(4, 3, 2, 2\)"),
    (torch.zeros(4, 3, 2, 2, dtype=torch.float64), {}, "torch.float32"),
    (torch.zeros(4, 3, 2, 2), {"renorm": True}, "renorm=True"),
])
def test_bad_residual_names_what_was_expected(residual, options, match):
    layer = batchnorm.BatchNorm2d(3, **options)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, 3, 2, 2), residual)


@pytest.mark.parametrize("decompose", [True, False], ids=["decomposed", "operators"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training, decompose, monkeypatch):
    monkeypatch.setattr(F, "DECOMPOSE_UNDER_COMPILE", decompose)
    torch._dynamo.reset()
    ours, plain = _pair(batchnorm.BatchNorm2d, nn.BatchNorm2d, 3, "relu")
    ours, plain = ours.float(), plain.float()
    ours.train(training)
    plain.train(training)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 4, 4, requires_grad=True)
        r = torch.randn(4, 3, 4, 4, requires_grad=True)
        y = compiled(x, r)
        expected = torch.relu(plain(x) + r)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y.sum(), (x, r))
        expected_grads = torch.autograd.grad(expected.sum(), (x, r))
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, plain.running_var, rtol=1e-6, atol=1e-6)


def test_func_grad_sees_the_residual():
    generator = torch.Generator().manual_seed(4)
    x, r = (torch.randn(4, 3, 5, dtype=torch.float64, generator=generator) for _ in range(2))

    def loss(x, r):
        return F.batch_norm(x, None, None, training=True, activation="elu", residual=r).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(x, r)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    nn.functional.elu(nn.functional.batch_norm(x1, None, None, training=True) + r1).sum() \
        .backward()
    torch.testing.assert_close(grads, (x1.grad, r1.grad), **TOL)
