"""The public layers against torch.nn in float64 on the same float32 values, with data that
makes each term matter: a large eps (0.5, so dropping it or adding it twice moves outputs
by ~20 %), a mean offset of 1e4, a constant channel and a constant row. Outputs, input and
parameter gradients, and running statistics over three steps.

Each backend is reached through the public layers by running this file under it:
``make test`` runs it by default (the compiled operators), with ``BATCHNORM_BACKEND=torch``
(the composite operators on the reference primitives) and with ``BATCHNORM_BACKEND=triton``
(the composite operators on the Triton kernels, under Triton's interpreter without a GPU).
The plain layers' route to torch's own kernels (the CUDA default) is forced here on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import kernels
from batchnorm.kernels import reference

EPS = 0.5


def _data(shape: tuple[int, ...], offset: float, channels_last: bool = False) -> torch.Tensor:
    """float32 values with a mean offset, one constant channel and one constant sample."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + offset
    x[:, 0] = offset + 0.5  # a constant channel
    x[1] = offset - 0.25  # a constant sample (row / instance / group)
    x = x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _affine(layer: nn.Module) -> nn.Module:
    """Parameters that are not ones and zeros, so that both terms of the affine matter."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(torch.linspace(0.5, 1.5, param.numel()).view_as(param)
                        if name == "weight" else torch.linspace(-1, 1, param.numel())
                        .view_as(param))
    return layer


CASES = {
    "batch_norm NCHW": (lambda: nn.BatchNorm2d(4, eps=EPS), (6, 4, 5, 5), False),
    "batch_norm channels_last": (lambda: nn.BatchNorm2d(4, eps=EPS), (6, 4, 5, 5), True),
    # (M, C) = (9216, 12): the column sums' 64 row blocks of 144 rows, each flushed from
    # float into double once within the block and once at its end
    "batch_norm channels_last row blocks": (lambda: nn.BatchNorm2d(12, eps=EPS),
                                            (16, 12, 24, 24), True),
    "batch_norm (N, C)": (lambda: nn.BatchNorm1d(40, eps=EPS), (32, 40), False),
    "batch_norm (N, C, L)": (lambda: nn.BatchNorm1d(4, eps=EPS), (5, 4, 33), False),
    "instance_norm": (lambda: nn.InstanceNorm2d(4, eps=EPS, affine=True,
                                                track_running_stats=True), (3, 4, 6, 5),
                      False),
    "instance_norm channels_last": (lambda: nn.InstanceNorm2d(4, eps=EPS, affine=True,
                                                              track_running_stats=True),
                                    (3, 4, 6, 5), True),
    "group_norm": (lambda: nn.GroupNorm(2, 4, eps=EPS), (3, 4, 6, 5), False),
    "group_norm channels_last": (lambda: nn.GroupNorm(2, 4, eps=EPS), (3, 4, 6, 5), True),
    "layer_norm": (lambda: nn.LayerNorm((4, 7), eps=EPS), (3, 5, 4, 7), False),
}
if kernels.forced_backend() != "triton":  # minutes under Triton's interpreter
    # past the compiled kernels' streaming threshold (4M values with 4+ rows): statistics
    # and gradient sums in memory order, two row blocks of 4 samples merged
    CASES["batch_norm NCHW streamed"] = (lambda: nn.BatchNorm2d(4, eps=EPS), (8, 4, 364, 364),
                                         False)


def test_the_forced_backend_runs():
    """A forced compiled backend that cannot run would silently test the reference."""
    forced = kernels.forced_backend()
    if forced in ("cpp", "triton"):
        assert kernels.primitives(torch.zeros(1)) is not reference, forced


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset-1e4"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layers_match_float64_torch_nn(case, offset):
    """Outputs within 1e-3 (the offset-1e4 bar: a float32 mean is exact to 5e-4 there),
    input gradients within 1e-3 relative + 1e-3, parameter gradients within 1e-3 of their
    largest magnitude (a sum over up to 165 values each carrying the mean's rounding;
    torch.nn's own float32 layer misses float64 by 8e-4 of it on the (N, C) case), running
    statistics within 1e-5 relative + 1e-3 (the running mean carries the offset)."""
    _check_against_float64(case, offset)


def _check_against_float64(case, offset: float, device: str = "cpu") -> None:
    """``case`` on ``device`` against the float64 torch.nn layer on CPU."""
    make, shape, channels_last = case
    reference64 = _affine(make()).double()
    ours = batchnorm.convert(copy.deepcopy(_affine(make()))).to(device)
    for step in range(3):
        x = _data(shape, offset + step, channels_last).to(device).requires_grad_()
        x64 = x.detach().cpu().double().requires_grad_()
        y = ours(x)
        y.backward(torch.cos(y.detach()))
        y64 = reference64(x64)
        y64.backward(torch.cos(y.detach().cpu().double()))
        torch.testing.assert_close(y.cpu().double(), y64.detach(), rtol=0, atol=1e-3)
        torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-3, atol=1e-3)
        for (name, p), p64 in zip(ours.named_parameters(), reference64.parameters(),
                                  strict=True):
            torch.testing.assert_close(p.grad.cpu().double(), p64.grad, rtol=0,
                                       atol=1e-3 * float(p64.grad.abs().max()), msg=name)
            p.grad = p64.grad = None
    for name, buffer in reference64.named_buffers():
        torch.testing.assert_close(getattr(ours, name).cpu().to(buffer.dtype), buffer,
                                   rtol=1e-5, atol=1e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="NO CUDA DEVICE: the float64 bars on the GPU's kernels (Triton) "
                    "need a GPU")
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset-1e4"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layers_on_cuda_match_float64_torch_nn(case, offset):
    """The bars of :func:`test_layers_match_float64_torch_nn` on a GPU, every layout
    included: the default route, which torch's CUDA kernels would fail (see
    batchnorm.ops.native)."""
    _check_against_float64(case, offset, "cuda")


# The cases the opt-in route to torch's kernels takes (channels-last InstanceNorm and
# GroupNorm keep the kernel primitives), on CPU. torch's CPU channels-last BatchNorm kernel
# sums x and x^2 in one pass and misses the offset-1e4 bar, so that case runs centred only:
# what is tested here is that the route computes what those kernels compute, with our
# operators' contract around them.
NATIVE_CASES = [pytest.param(CASES[name], offset, id=f"{name}-{label}")
                for name in ("batch_norm NCHW", "batch_norm channels_last", "batch_norm (N, C)",
                             "batch_norm (N, C, L)", "instance_norm", "group_norm",
                             "layer_norm")
                for offset, label in ((0.0, "centred"), (1e4, "offset-1e4"))
                if not (name == "batch_norm channels_last" and offset)]


@pytest.mark.parametrize(("case", "offset"), NATIVE_CASES)
def test_plain_layers_on_torch_kernels_match_float64_torch_nn(case, offset):
    """The opt-in route for the plain layers (``BATCHNORM_BACKEND=aten``): torch's own
    kernels behind our operators, against the bars above."""
    with kernels.use_backend("aten"), torch.profiler.profile() as profile:
        _check_against_float64(case, offset)
    names = {event.key for event in profile.key_averages()}
    assert names & {"aten::native_batch_norm", "aten::native_group_norm",
                    "aten::native_layer_norm"}, sorted(names)
