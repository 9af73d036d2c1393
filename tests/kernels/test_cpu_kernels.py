"""The C++ CPU kernels against :mod:`batchnorm.kernels.reference` and against float64 math
written out here, on both loop regimes of the channels view (short Q: channels-last columns,
long Q: contiguous segments), with and without the residual (the ``*_residual`` kernels),
and on the rows view.

Tolerances, relative to the largest magnitude of the quantity compared (at least 1), or for
sums to the sum of the absolute terms: outputs in x's dtype 2e-5 (float32), 1e-12 (float64),
2e-3 (float16), 1.6e-2 (bfloat16: two rounding steps of 2^-8); statistics and sums, kept in
float32 for half inputs, 2e-5 (1e-12 for float64 input). Under a mean offset of 1e4 (std 1)
the normalized float32 output is within 1e-3 of float64: half an ulp of 1e4 (4.9e-4) is the
input's own precision.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from fresh_process import call_in_new_process

from batchnorm.kernels import cpu, extension, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OUTPUT_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3,
               torch.bfloat16: 1.6e-2}
ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("relu6", 0.0), ("leaky_relu", 0.2),
               ("elu", 0.7), ("silu", 0.0)]
# (P, C, Q), chunk: one chunk, several, an uneven last chunk, chunk > P; Q == 1 and short Q
# (columns), long Q not a multiple of the vector width (segments), a segment longer than
# one float32 run of the accumulator, enough rows for several row blocks, and few rows of
# many columns (summed in column parts with more than one thread; 300 is no multiple of a
# vector, so the last part ends in a partial vector)
CASES = [
    ((64, 30, 1), 64), ((64, 30, 1), 1), ((64, 30, 1), 5), ((64, 30, 1), 100),
    ((300, 13, 1), 300), ((300, 13, 1), 128), ((300, 13, 1), 7),
    ((100, 300, 1), 100), ((100, 300, 1), 30), ((200, 150, 2), 200),
    ((130, 5, 3), 130), ((130, 5, 3), 20),
    ((6, 9, 17), 6), ((6, 9, 17), 1), ((6, 9, 17), 4),
    ((4, 3, 100), 2), ((4, 3, 100), 3), ((3, 2, 2500), 3),
]
# columns past 2**18 values: the statistics add one row at a time (below, four)
UNGROUPED = [((2100, 130, 1), 2100), ((2100, 130, 1), 300)]
# few (chunk, channel) items of many values: the rows of a group are split into blocks
LONG_GROUPS = ((6, 2, 100_000), 6)
# at least 4M values (past the caches) with 4 or more rows per group: summed in memory
# order over blocks of rows (4 blocks; chunks of 9 rows: 2 uneven blocks each, and a last
# chunk of 2 rows: one per block)
STREAMED = [((16, 8, 33_000), 16), ((20, 8, 27_000), 9)]


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    if not extension.available():
        pytest.skip("the C++ CPU kernels could not be built on this machine (see the warning)")


def stat_rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 2e-5


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
          scale: torch.Tensor | None = None) -> None:
    """max |actual - expected| <= rtol * scale, scale the largest |expected| (at least 1)
    unless given (the size of the terms behind a sum)."""
    expected = expected.double()
    bound = expected.abs() if scale is None else scale.double()
    limit = rtol * max(1.0, bound.max().item())
    error = (actual.double() - expected).abs().max().item()
    assert error <= limit, f"max error {error:.3g} > {limit:.3g}"


def sample(shape: tuple[int, ...], dtype: torch.dtype, offset: float = 0.5) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * 1.5 + offset).to(dtype)


def chunk_bounds(rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(a * chunk, min(rows, (a + 1) * chunk)) for a in range(math.ceil(rows / chunk))]


def stats64(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per (chunk, channel), two-pass in float64."""
    means, variances = [], []
    for lo, hi in chunk_bounds(x.shape[0], chunk):
        group = x[lo:hi].double()
        mean = group.mean((0, 2))
        means.append(mean)
        variances.append((group - mean[:, None]).square().mean((0, 2)))
    return torch.stack(means), torch.stack(variances)


def per_row64(table: torch.Tensor, rows: int, chunk: int) -> torch.Tensor:
    return table.double().repeat_interleave(chunk, 0)[:rows].unsqueeze(-1)


def chunk_sums64(values: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.stack([values[lo:hi].sum((0, 2))
                        for lo, hi in chunk_bounds(values.shape[0], chunk)])


def act64(z: torch.Tensor, name: str, param: float) -> torch.Tensor:
    functional = torch.nn.functional
    return {"identity": lambda t: t, "relu": torch.relu, "relu6": functional.relu6,
            "leaky_relu": lambda t: functional.leaky_relu(t, param),
            "elu": lambda t: functional.elu(t, param), "silu": functional.silu}[name](z)


def gated64(dy: torch.Tensor, z: torch.Tensor, name: str, param: float) -> torch.Tensor:
    """dy * act'(z) in float64, by autograd through act64."""
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(act64(z, name, param), z, dy.double())
    return grad


def tables(x: torch.Tensor, chunk: int, count: int = 3) -> list[torch.Tensor]:
    """Per-(chunk, channel) tables in the accumulation dtype: scale in [0.5, 4.5) (so that
    pre-activations pass relu6's upper kink), others unit normal."""
    mean, _ = reference.channel_stats(x, chunk)
    scale = torch.rand_like(mean) * 4 + 0.5
    return [mean, scale] + [torch.randn_like(mean) for _ in range(count - 2)]


def pre_activation64(x: torch.Tensor, residual: torch.Tensor | None, mean: torch.Tensor,
                     scale: torch.Tensor, shift: torch.Tensor, chunk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean, z) in float64, z = (x - mean) * scale + shift [+ residual]."""
    rows = x.shape[0]
    centered = x.double() - per_row64(mean, rows, chunk)
    z = centered * per_row64(scale, rows, chunk) + per_row64(shift, rows, chunk)
    return centered, z if residual is None else z + residual.double()


RESIDUAL = pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])


# ---------------------------------------------------------------- channels view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "chunk"), [*CASES, *UNGROUPED])
def test_channel_stats_match_reference_and_float64(shape, chunk, dtype):
    x = sample(shape, dtype)
    mean, var = cpu.channel_stats(x, chunk)
    ref_mean, ref_var = reference.channel_stats(x, chunk)
    mean64, var64 = stats64(x, chunk)
    assert mean.dtype == ref_mean.dtype and mean.shape == ref_mean.shape
    assert var.dtype == ref_var.dtype and var.shape == ref_var.shape
    rtol = stat_rtol(dtype)
    close(mean, mean64, rtol)
    close(var, var64, rtol)
    close(mean, ref_mean, rtol)
    close(var, ref_var, rtol)


@RESIDUAL
@pytest.mark.parametrize(("activation", "param"), ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "chunk"), CASES)
def test_channel_normalize_matches_reference_and_float64(shape, chunk, dtype, activation,
                                                         param, residual):
    x = sample(shape, dtype)
    r = sample(shape, dtype, offset=-0.5) if residual else None
    tables_ = tables(x, chunk)
    options = (chunk, activation, param)
    if residual:
        y = cpu.channel_normalize_residual(x, r, *tables_, *options)
        expected = reference.channel_normalize_residual(x, r, *tables_, *options)
    else:
        y = cpu.channel_normalize(x, *tables_, *options)
        expected = reference.channel_normalize(x, *tables_, *options)
    _, z64 = pre_activation64(x, r, *tables_, chunk)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, act64(z64, activation, param), OUTPUT_RTOL[dtype])
    close(y, expected, OUTPUT_RTOL[dtype])


@RESIDUAL
@pytest.mark.parametrize(("activation", "param"), ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "chunk"), CASES)
def test_channel_backward_reduce_matches_reference_and_float64(shape, chunk, dtype,
                                                               activation, param, residual):
    x = sample(shape, dtype)
    dy = sample(shape, dtype, offset=0.0)
    r = sample(shape, dtype, offset=-0.5) if residual else None
    tables_ = tables(x, chunk)
    options = (chunk, activation, param)
    if residual:
        sum_g, sum_g_xc = cpu.channel_backward_reduce_residual(dy, x, r, *tables_, *options)
        ref_g, ref_g_xc = reference.channel_backward_reduce_residual(dy, x, r, *tables_,
                                                                     *options)
    else:
        sum_g, sum_g_xc = cpu.channel_backward_reduce(dy, x, *tables_, *options)
        ref_g, ref_g_xc = reference.channel_backward_reduce(dy, x, *tables_, *options)
    centered, z64 = pre_activation64(x, r, *tables_, chunk)
    g = gated64(dy, z64, activation, param)
    rtol = stat_rtol(dtype)
    close(sum_g, chunk_sums64(g, chunk), rtol, chunk_sums64(g.abs(), chunk))
    close(sum_g_xc, chunk_sums64(g * centered, chunk), rtol,
          chunk_sums64((g * centered).abs(), chunk))
    assert sum_g.dtype == ref_g.dtype and sum_g.shape == ref_g.shape
    close(sum_g, ref_g, rtol, chunk_sums64(g.abs(), chunk))
    close(sum_g_xc, ref_g_xc, rtol, chunk_sums64((g * centered).abs(), chunk))


@RESIDUAL
@pytest.mark.parametrize(("activation", "param"), ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "chunk"), CASES)
def test_channel_backward_input_matches_reference_and_float64(shape, chunk, dtype,
                                                              activation, param, residual):
    x = sample(shape, dtype)
    dy = sample(shape, dtype, offset=0.0)
    r = sample(shape, dtype, offset=-0.5) if residual else None
    tables_ = tables(x, chunk, count=6)
    options = (chunk, activation, param)
    if residual:
        dx, dr = cpu.channel_backward_input_residual(dy, x, r, *tables_, *options)
        expected, expected_dr = reference.channel_backward_input_residual(dy, x, r, *tables_,
                                                                          *options)
    else:
        dx = cpu.channel_backward_input(dy, x, *tables_, *options)
        expected = reference.channel_backward_input(dy, x, *tables_, *options)
    rows = shape[0]
    centered, z64 = pre_activation64(x, r, *tables_[:3], chunk)
    g = gated64(dy, z64, activation, param)
    k1, k0, k2 = tables_[3:]
    terms = (g * per_row64(k1, rows, chunk), per_row64(k0, rows, chunk).expand_as(g),
             centered * per_row64(k2, rows, chunk))
    size = sum(term.abs() for term in terms)
    assert dx.dtype == dtype and dx.shape == x.shape
    close(dx, sum(terms), OUTPUT_RTOL[dtype], size)
    close(dx, expected, OUTPUT_RTOL[dtype], size)
    if residual:
        assert dr.dtype == dtype and dr.shape == x.shape
        close(dr, g, OUTPUT_RTOL[dtype])
        close(dr, expected_dr, OUTPUT_RTOL[dtype])


@pytest.mark.parametrize(("shape", "chunk"), [LONG_GROUPS, *STREAMED])
def test_long_groups_summed_in_row_blocks_match_float64(shape, chunk):
    x = sample(shape, torch.float32, offset=3.0)
    dy = sample(shape, torch.float32, offset=0.0)
    mean, var = cpu.channel_stats(x, chunk)
    mean64, var64 = stats64(x, chunk)
    close(mean, mean64, 2e-5)
    close(var, var64, 2e-5)
    scale, shift = torch.rand_like(mean) + 0.5, torch.randn_like(mean)
    sum_g, sum_g_xc = cpu.channel_backward_reduce(dy, x, mean, scale, shift, chunk, "relu", 0.0)
    rows = shape[0]
    centered = x.double() - per_row64(mean, rows, chunk)
    g = gated64(dy, centered * per_row64(scale, rows, chunk) + per_row64(shift, rows, chunk),
                "relu", 0.0)
    close(sum_g, chunk_sums64(g, chunk), 2e-5, chunk_sums64(g.abs(), chunk))
    close(sum_g_xc, chunk_sums64(g * centered, chunk), 2e-5,
          chunk_sums64((g * centered).abs(), chunk))


@pytest.mark.parametrize(("shape", "chunk"), [((500, 7, 1), 500), ((500, 7, 1), 64),
                                              ((40, 5, 4), 40), ((8, 3, 300), 8),
                                              ((8, 3, 300), 1), *UNGROUPED, *STREAMED])
def test_channel_stats_stay_exact_under_a_mean_offset_of_1e4(shape, chunk):
    x = (torch.randn(shape, dtype=torch.float64) + 1e4).float()
    mean, var = cpu.channel_stats(x, chunk)
    invstd = torch.rsqrt(var + 1e-5)
    y = cpu.channel_normalize(x, mean, invstd, torch.zeros_like(mean), chunk, "identity", 0.0)
    mean64, var64 = stats64(x, chunk)
    rows = shape[0]
    y64 = (x.double() - per_row64(mean64, rows, chunk)) / per_row64(var64 + 1e-5, rows,
                                                                      chunk).sqrt()
    close(var, var64, 1e-5)
    assert (y.double() - y64).abs().max().item() < 1e-3


@pytest.mark.parametrize(("shape", "chunk"), [((70, 6, 1), 70), ((70, 6, 1), 9),
                                              ((5, 4, 33), 5), ((5, 4, 33), 2), *STREAMED])
def test_constant_channels_have_zero_variance_and_their_exact_mean(shape, chunk):
    x = torch.full(shape, 3.7)
    mean, var = cpu.channel_stats(x, chunk)
    assert torch.equal(mean, torch.full_like(mean, 3.7))
    assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("shape", "chunk"), [((70, 6, 1), 30), ((600, 6, 1), 300),
                                              ((6, 4, 33), 2), STREAMED[1]])
def test_nan_and_inf_reach_the_statistics_of_their_group_only(shape, chunk, value):
    x = sample(shape, torch.float32)
    x[chunk + 1, 2, shape[2] - 1] = value  # group 1, channel 2
    mean, var = cpu.channel_stats(x, chunk)
    bad = torch.zeros_like(mean, dtype=torch.bool)
    bad[1, 2] = True
    assert not mean[1, 2].isfinite() and var[1, 2].isnan()
    assert mean[~bad].isfinite().all() and var[~bad].isfinite().all()


@pytest.mark.parametrize(("shape", "chunk"), [((70, 6, 1), 30), ((6, 4, 33), 2),
                                              STREAMED[1]])
def test_nan_gradient_reaches_the_sums_of_its_group_only(shape, chunk):
    x = sample(shape, torch.float32)
    dy = sample(shape, torch.float32, offset=0.0)
    dy[chunk + 1, 2, 0] = math.nan
    mean, scale, shift = tables(x, chunk)
    sums = cpu.channel_backward_reduce(dy, x, mean, scale, shift, chunk, "identity", 0.0)
    for total in sums:
        assert total[1, 2].isnan()
        total[1, 2] = 0.0
        assert total.isfinite().all()


# few rows of many columns: split into column parts whose number follows the thread count
WIDE_ROWS = ((100, 300, 1), 100)
DETERMINISM_CASES = [((3000, 24, 1), 3000), ((3000, 24, 1), 700), ((2000, 10, 3), 2000),
                     ((16, 12, 300), 16), ((16, 12, 300), 3), LONG_GROUPS, WIDE_ROWS,
                     ((100, 300, 1), 30), *STREAMED]


def under_threads(threads: int, function, *args):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("shape", "chunk"), DETERMINISM_CASES)
def test_channel_kernels_are_bitwise_identical_for_any_thread_count(shape, chunk):
    x = sample(shape, torch.float32)
    dy = sample(shape, torch.float32, offset=0.0)
    mean, scale, shift, k1, k0, k2 = tables(x, chunk, count=6)
    calls = [
        (cpu.channel_stats, x, chunk),
        (cpu.channel_normalize, x, mean, scale, shift, chunk, "silu", 0.0),
        (cpu.channel_backward_reduce, dy, x, mean, scale, shift, chunk, "leaky_relu", 0.1),
        (cpu.channel_backward_input, dy, x, mean, scale, shift, k1, k0, k2, chunk, "elu", 1.0),
    ]
    for function, *args in calls:
        one = under_threads(1, function, *args)
        for threads in (2, 3):
            many = under_threads(threads, function, *args)
            for a, b in zip(torch.utils._pytree.tree_leaves(one),
                            torch.utils._pytree.tree_leaves(many), strict=True):
                assert torch.equal(a, b), f"{function.__name__} differs with {threads} threads"


def test_non_contiguous_gradients_give_the_contiguous_result():
    x = sample((40, 6, 9), torch.float32)
    dy = sample((9, 6, 40), torch.float32).permute(2, 1, 0)
    mean, scale, shift, k1, k0, k2 = tables(x, 8, count=6)
    assert not dy.is_contiguous()
    for a, b in zip(cpu.channel_backward_reduce(dy, x, mean, scale, shift, 8, "relu", 0.0),
                    cpu.channel_backward_reduce(dy.contiguous(), x, mean, scale, shift, 8,
                                                "relu", 0.0), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        cpu.channel_backward_input(dy, x, mean, scale, shift, k1, k0, k2, 8, "relu", 0.0),
        cpu.channel_backward_input(dy.contiguous(), x, mean, scale, shift, k1, k0, k2, 8,
                                   "relu", 0.0))
    rows = sample((20, 30), torch.float32)
    _, row_mean, row_invstd = cpu.rows_forward(rows, None, None, 1e-5)
    row_dy = sample((30, 20), torch.float32).t()
    for a, b in zip(cpu.rows_backward(row_dy, rows, row_mean, row_invstd, None),
                    cpu.rows_backward(row_dy.contiguous(), rows, row_mean, row_invstd, None),
                    strict=True):
        assert torch.equal(a, b)


def test_bad_arguments_name_the_argument():
    x = sample((4, 3, 5), torch.float32)
    mean, scale, shift = tables(x, 2)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        cpu.channel_normalize(x, mean, scale, shift, 2, "gelu", 0.0)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(2, 3\)"):
        cpu.channel_normalize(x, mean, scale[:1], shift, 2, "relu", 0.0)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        cpu.channel_stats(x, 0)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        cpu.channel_stats(x.int(), 2)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(5,\)"):
        cpu.rows_forward(x[0], torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"residual must match x \(Float \[4, 3, 5\]\), got "
                       r"Double \[4, 3, 5\]"):
        cpu.channel_normalize_residual(x, x.double(), mean, scale, shift, 2, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"dy must match x \(Float \[4, 3, 5\]\), got "
                       r"Float \[4, 3, 4\]"):
        cpu.channel_backward_reduce(x[..., :4], x, mean, scale, shift, 2, "relu", 0.0)


# ---------------------------------------------------------------- rows view

ROW_SHAPES = [(1, 1), (5, 7), (37, 33), (200, 300), (3, 2500)]


def rows64(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.double()
    mean = x.mean(1)
    var = (x - mean[:, None]).square().mean(1)
    invstd = (var + eps).rsqrt()
    return (x - mean[:, None]) * invstd[:, None], mean, invstd


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rows_forward_matches_reference_and_float64(shape, dtype, affine):
    x = sample(shape, dtype)
    weight = torch.randn(shape[1], dtype=dtype) if affine else None
    bias = torch.randn(shape[1], dtype=dtype) if affine else None
    y, mean, invstd = cpu.rows_forward(x, weight, bias, 1e-5)
    x_hat64, mean64, invstd64 = rows64(x, 1e-5)
    y64 = x_hat64 * weight.double() + bias.double() if affine else x_hat64
    ref = reference.rows_forward(x, weight, bias, 1e-5)
    assert y.dtype == dtype and mean.dtype == ref[1].dtype and invstd.dtype == ref[2].dtype
    rtol = stat_rtol(dtype)
    close(mean, mean64, rtol)
    close(invstd, invstd64, rtol)
    close(y, y64, OUTPUT_RTOL[dtype])
    close(y, ref[0], OUTPUT_RTOL[dtype])
    close(mean, ref[1], rtol)
    close(invstd, ref[2], rtol)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rows_backward_matches_reference_and_float64(shape, dtype, affine):
    x = sample(shape, dtype)
    dy = sample(shape, dtype, offset=0.0)
    weight = torch.randn(shape[1], dtype=dtype) if affine else None
    _, mean, invstd = reference.rows_forward(x, weight, None, 1e-5)
    dx, sum_dy_xhat, sum_dy = cpu.rows_backward(dy, x, mean, invstd, weight)
    x_hat = (x.double() - mean.double()[:, None]) * invstd.double()[:, None]
    g = dy.double()
    gh = g * weight.double() if affine else g
    dx64 = invstd.double()[:, None] * (gh - gh.mean(1, keepdim=True)
                                       - x_hat * (gh * x_hat).mean(1, keepdim=True))
    dx_size = invstd.double()[:, None] * (gh.abs() + gh.abs().mean(1, keepdim=True)
                                          + x_hat.abs() * (gh * x_hat).abs().mean(1, keepdim=True))
    rtol = stat_rtol(dtype)
    close(dx, dx64, OUTPUT_RTOL[dtype], dx_size)
    close(sum_dy_xhat, (g * x_hat).sum(0), rtol, (g * x_hat).abs().sum(0))
    close(sum_dy, g.sum(0), rtol, g.abs().sum(0))
    ref = reference.rows_backward(dy, x, mean, invstd, weight)
    assert dx.dtype == dtype and sum_dy.dtype == ref[2].dtype
    close(dx, ref[0], OUTPUT_RTOL[dtype], dx_size)
    close(sum_dy_xhat, ref[1], rtol, (g * x_hat).abs().sum(0))
    close(sum_dy, ref[2], rtol, g.abs().sum(0))


def test_rows_forward_stays_exact_under_a_mean_offset_of_1e4():
    x = (torch.randn(64, 500, dtype=torch.float64) + 1e4).float()
    y, _, invstd = cpu.rows_forward(x, None, None, 1e-5)
    y64, _, invstd64 = rows64(x, 1e-5)
    close(invstd, invstd64, 1e-5)
    assert (y.double() - y64).abs().max().item() < 1e-3


def test_constant_rows_normalize_to_zero():
    x = torch.full((9, 40), -2.25)
    y, mean, invstd = cpu.rows_forward(x, None, None, 1e-5)
    assert torch.equal(mean, torch.full_like(mean, -2.25))
    close(invstd, torch.full((9,), 1 / math.sqrt(1e-5), dtype=torch.float64), 1e-6)
    assert torch.equal(y, torch.zeros_like(y))


def test_nan_in_a_row_reaches_its_statistics_only():
    x = sample((10, 50), torch.float32)
    x[3, 17] = math.nan
    y, mean, invstd = cpu.rows_forward(x, None, None, 1e-5)
    assert mean[3].isnan() and invstd[3].isnan() and y[3].isnan().all()
    others = torch.arange(10) != 3
    assert mean[others].isfinite().all() and y[others].isfinite().all()


def test_rows_kernels_are_bitwise_identical_for_any_thread_count():
    x = sample((1000, 130), torch.float32)
    dy = sample((1000, 130), torch.float32, offset=0.0)
    weight, bias = torch.randn(130), torch.randn(130)
    _, mean, invstd = cpu.rows_forward(x, weight, bias, 1e-5)
    for function, *args in [(cpu.rows_forward, x, weight, bias, 1e-5),
                            (cpu.rows_backward, dy, x, mean, invstd, weight)]:
        one = under_threads(1, function, *args)
        for threads in (2, 3):
            many = under_threads(threads, function, *args)
            for a, b in zip(one, many, strict=True):
                assert torch.equal(a, b), f"{function.__name__} differs with {threads} threads"


def map_outputs() -> list[torch.Tensor]:
    """Outputs of every elementwise map, plain and residual, in both loop regimes (a vector
    multiple and not), float32 and float64, for comparing runs under different store kinds."""
    torch.manual_seed(0)
    outputs = []
    for shape, dtype in [((9, 5, 64), torch.float32), ((40, 24, 1), torch.float32),
                         ((7, 3, 37), torch.float64), ((33, 10, 1), torch.float64)]:
        x = sample(shape, dtype)
        r = sample(shape, dtype, offset=-0.5)
        dy = sample(shape, dtype, offset=0.0)
        mean, scale, shift, k1, k0, k2 = tables(x, 4, count=6)
        options = (4, "silu", 0.0)
        outputs += [cpu.channel_normalize(x, mean, scale, shift, *options),
                    cpu.channel_normalize_residual(x, r, mean, scale, shift, *options),
                    cpu.channel_backward_input(dy, x, mean, scale, shift, k1, k0, k2, *options),
                    *cpu.channel_backward_input_residual(dy, x, r, mean, scale, shift, k1, k0,
                                                         k2, *options)]
    return outputs


def run_maps_with_stream_limit(limit: str, out: Path) -> subprocess.CompletedProcess:
    """:func:`map_outputs` saved to ``out`` by a process that reads this BATCHNORM_STREAM_MB."""
    return call_in_new_process(
        __file__, f"import torch; torch.save(test['map_outputs'](), {str(out)!r})",
        BATCHNORM_STREAM_MB=limit)


def test_streamed_outputs_equal_stored_ones(tmp_path):
    """Outputs from BATCHNORM_STREAM_MB up (default: the last-level cache's size) are written
    with non-temporal stores; at 0 every output is, and the values are the same bits."""
    run = run_maps_with_stream_limit("0", tmp_path / "streamed.pt")
    assert run.returncode == 0, run.stderr
    streamed = torch.load(tmp_path / "streamed.pt", weights_only=True)
    for index, (a, b) in enumerate(zip(streamed, map_outputs(), strict=True)):
        assert torch.equal(a, b), f"output {index} differs when streamed"


def test_a_bad_stream_limit_is_named(tmp_path):
    run = run_maps_with_stream_limit("big", tmp_path / "unused.pt")
    assert run.returncode != 0
    assert "BATCHNORM_STREAM_MB must be a non-negative integer (MiB), got 'big'" in run.stderr
