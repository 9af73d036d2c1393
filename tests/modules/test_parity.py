"""Our layers against torch.nn over several training steps and then eval: outputs, input
and parameter gradients, running statistics and num_batches_tracked.

Tolerances: float64 1e-10 (both sides are exact formulas in double precision); float32
rtol 1e-5 / atol 1e-5 (different but equally valid summation orders); bfloat16 compares
outputs to one bfloat16 ulp at |y| < 4 (atol 1/32) since each side rounds once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
             torch.bfloat16: (1 / 32, 1 / 32)}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    if layout == "noncontiguous":
        # every other sample of a batch twice as large: strided along N
        return torch.cat([x, x], 0).view(2, *x.shape).transpose(0, 1)[:, 0]
    return x


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype) -> None:
    if expected is None:
        assert actual is None
        return
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float() if dtype == torch.bfloat16 else actual,
                               expected.float() if dtype == torch.bfloat16 else expected,
                               rtol=rtol, atol=atol)


def run_parity(reference: nn.Module, ours: nn.Module, shape: tuple[int, ...], *,
               dtype=torch.float32, layout: str = "contiguous", steps: int = 3,
               seed: int = 0) -> None:
    """Train both layers for ``steps`` batches, then one eval batch, comparing everything."""
    ours.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(seed)
    for training in [True] * steps + [False]:
        reference.train(training)
        ours.train(training)
        reference.zero_grad()
        ours.zero_grad()
        base = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1)
        x_ref = _layout(base.to(dtype), layout).requires_grad_()
        x_ours = _layout(base.to(dtype), layout).requires_grad_()
        y_ref, y_ours = reference(x_ref), ours(x_ours)
        assert_close(y_ours, y_ref, dtype)
        assert y_ours.dtype == y_ref.dtype
        grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        y_ref.backward(grad)
        y_ours.backward(grad)
        assert_close(x_ours.grad, x_ref.grad, dtype)
        for name, param in reference.named_parameters():
            assert_close(getattr(ours, name).grad, param.grad, dtype)
        for (name, expected), actual in zip(reference.state_dict().items(),
                                            ours.state_dict().values(), strict=True):
            if expected.is_floating_point():
                assert_close(actual, expected, dtype)
            else:
                assert torch.equal(actual, expected), name
        if layout == "channels_last" and training:
            assert y_ours.is_contiguous(memory_format=torch.channels_last
                                        if y_ours.dim() == 4 else torch.channels_last_3d)


BATCH_NORM_CASES = [
    ("BatchNorm1d", (8, 4)),
    ("BatchNorm1d", (6, 4, 7)),  # 3-D input to the 1d layer
    ("BatchNorm2d", (4, 3, 5, 6)),
    ("BatchNorm3d", (3, 2, 3, 4, 5)),
]
OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(map(str, o.items())) or
                         "defaults")
@pytest.mark.parametrize(("name", "shape"), BATCH_NORM_CASES, ids=lambda c: str(c))
def test_batch_norm_matches_torch_over_training_steps_and_eval(name, shape, options):
    run_parity(getattr(nn, name)(shape[1], **options), getattr(batchnorm, name)(shape[1],
               **options), shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("name", "shape"), BATCH_NORM_CASES, ids=lambda c: str(c))
def test_batch_norm_matches_torch_in_other_dtypes(name, shape, dtype):
    run_parity(getattr(nn, name)(shape[1], dtype=dtype),
               getattr(batchnorm, name)(shape[1], dtype=dtype), shape, dtype=dtype)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize(("name", "shape"), BATCH_NORM_CASES[2:], ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_matches_torch_on_strided_layouts(name, shape, layout, dtype):
    run_parity(getattr(nn, name)(shape[1], dtype=dtype),
               getattr(batchnorm, name)(shape[1], dtype=dtype), shape, dtype=dtype,
               layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_with_zero_batch_counts_the_step_and_keeps_statistics(dtype):
    run_parity(nn.BatchNorm2d(3, dtype=dtype), batchnorm.BatchNorm2d(3, dtype=dtype),
               (0, 3, 4, 4), dtype=dtype)


def test_turning_off_tracking_after_construction_behaves_as_torch():
    reference, ours = nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    run_parity(reference, ours, (4, 3, 5, 5), steps=2)
    reference.track_running_stats = ours.track_running_stats = False
    run_parity(reference, ours, (4, 3, 5, 5), steps=2, seed=1)
    reference.running_mean = ours.running_mean = None
    reference.running_var = ours.running_var = None
    run_parity(reference, ours, (4, 3, 5, 5), steps=1, seed=2)


@pytest.mark.parametrize("name", ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"])
def test_lazy_batch_norm_becomes_our_layer_and_matches_torch(name):
    ours = getattr(batchnorm, name)()
    dims = {"LazyBatchNorm1d": (6, 4), "LazyBatchNorm2d": (4, 4, 3, 3),
            "LazyBatchNorm3d": (2, 4, 2, 3, 3)}[name]
    ours(torch.randn(dims))
    assert type(ours) is getattr(batchnorm, name.removeprefix("Lazy"))
    reference = getattr(nn, name.removeprefix("Lazy"))(4)
    run_parity(reference, ours, dims)


INSTANCE_NORM_CASES = [("InstanceNorm1d", (3, 4, 7)), ("InstanceNorm1d", (4, 7)),
                       ("InstanceNorm2d", (3, 4, 5, 6)), ("InstanceNorm3d", (2, 4, 3, 4, 5))]


@pytest.mark.parametrize("options", [{}, {"affine": True}, {"track_running_stats": True},
                                     {"affine": True, "track_running_stats": True,
                                      "momentum": 0.3}, {"affine": True, "bias": False}],
                         ids=lambda o: ",".join(map(str, o.items())) or "defaults")
@pytest.mark.parametrize(("name", "shape"), INSTANCE_NORM_CASES, ids=lambda c: str(c))
def test_instance_norm_matches_torch(name, shape, options):
    channels = shape[0] if len(shape) == 2 else shape[1]  # (C, L) is an unbatched input
    run_parity(getattr(nn, name)(channels, **options),
               getattr(batchnorm, name)(channels, **options), shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_instance_norm_matches_torch_in_other_dtypes(dtype):
    run_parity(nn.InstanceNorm2d(4, affine=True, track_running_stats=True, dtype=dtype),
               batchnorm.InstanceNorm2d(4, affine=True, track_running_stats=True,
                                        dtype=dtype), (3, 4, 5, 6), dtype=dtype)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_instance_norm_matches_torch_on_strided_layouts(layout):
    run_parity(nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
               batchnorm.InstanceNorm2d(4, affine=True, track_running_stats=True),
               (3, 4, 5, 6), layout=layout)


@pytest.mark.parametrize("options", [{}, {"affine": False}, {"bias": False}, {"eps": 1e-2}],
                         ids=lambda o: ",".join(map(str, o.items())) or "defaults")
@pytest.mark.parametrize(("groups", "shape"), [(2, (3, 4, 5, 6)), (1, (3, 6, 7)),
                                               (6, (2, 6, 2, 3, 4)), (3, (5, 12))],
                         ids=str)
def test_group_norm_matches_torch(groups, shape, options):
    run_parity(nn.GroupNorm(groups, shape[1], **options),
               batchnorm.GroupNorm(groups, shape[1], **options), shape)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
def test_group_norm_matches_torch_in_dtypes_and_layouts(dtype, layout):
    run_parity(nn.GroupNorm(2, 4, dtype=dtype), batchnorm.GroupNorm(2, 4, dtype=dtype),
               (3, 4, 5, 6), dtype=dtype, layout=layout)


@pytest.mark.parametrize("options", [{}, {"elementwise_affine": False}, {"bias": False},
                                     {"eps": 1e-2}],
                         ids=lambda o: ",".join(map(str, o.items())) or "defaults")
@pytest.mark.parametrize(("normalized_shape", "shape"), [(7, (5, 7)), ((4, 7), (2, 3, 4, 7)),
                                                         ([3, 4, 5], (2, 3, 4, 5))], ids=str)
def test_layer_norm_matches_torch(normalized_shape, shape, options):
    run_parity(nn.LayerNorm(normalized_shape, **options),
               batchnorm.LayerNorm(normalized_shape, **options), shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layer_norm_matches_torch_in_other_dtypes(dtype):
    run_parity(nn.LayerNorm(7, dtype=dtype), batchnorm.LayerNorm(7, dtype=dtype), (5, 3, 7),
               dtype=dtype)
