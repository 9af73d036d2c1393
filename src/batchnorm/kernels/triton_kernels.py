"""The kernel primitives of :mod:`batchnorm.kernels.reference` as Triton kernels: the CUDA
implementation, with the same signatures and results (see the reference for the views,
tables and formulas), plus the ``*_residual`` ResNet-tail variants.

Each primitive is a ``torch.library.triton_op`` (namespace ``batchnorm_triton``) whose body
launches its kernels through ``wrap_triton``, so torch.compile and torch.export trace into
the kernels instead of stopping at an opaque call; called eagerly on plain tensors, the
primitive launches the kernels without the operator's dispatch. Any (P, C, Q) strides
work: NCHW views (Q > 1) and channels-last views (Q == 1) get tiles along their contiguous
dim. Ghost batches and InstanceNorm (several chunks, an uneven last one) take one launch
for all chunks. float16/bfloat16 accumulate in float32, float64 in float64.

Statistics are sums of ``x - pivot`` and its square, one pivot per (chunk, channel) (its
first value): one read of x, and a common offset of 1e4 on float32 data costs no digits.

Importable without triton: :func:`available` is then False and the primitives are absent.
On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported), which is how they are tested without a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from batchnorm.kernels.reference import accumulation_dtype, chunks

name = "triton"

try:
    import triton
    from torch.library import triton_op, wrap_triton
    from triton.runtime.interpreter import InterpretedFunction

    from batchnorm.kernels import _triton_jit as jit
    from batchnorm.kernels._triton_jit import (
        channel_apply_kernel,
        channel_reduce_kernel,
        finish_kernel,
        rows_backward_kernel,
        rows_forward_kernel,
    )
except ImportError as error:  # the 'cuda' extra is not installed (or torch predates triton_op)
    jit = None
    IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None

# Elements per tile: a GPU tile stays in registers; the interpreter runs a whole tile per
# numpy call, so larger tiles are faster there.
GPU_TILE = 2048
INTERPRETER_TILE = 1 << 14
# Programs a reduction aims for per streaming multiprocessor (more hide memory latency).
PROGRAMS_PER_SM = 4
# Tiles of work each split of a reduction gets at least.
MIN_TILES_PER_SPLIT = 4


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (they then run on CPU)."""
    return jit is not None and isinstance(jit.channel_reduce_kernel, InterpretedFunction)


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run on ``device`` (default: on anything here): CUDA tensors
    need triton and a GPU, CPU tensors need the interpreter. Says nothing on whether they
    are faster than another backend."""
    if jit is None:
        return False
    if device is None:
        return interpreted() or torch.cuda.is_available()
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()


def _activation_code(activation: str) -> int:
    if activation not in jit.ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(jit.ACTIVATION_CODES)}, "
                         f"got {activation!r}")
    return jit.ACTIVATION_CODES[activation]


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")


def _tables(x: Tensor, chunk: int, *tables: Tensor) -> list[Tensor]:
    """Per-(chunk, channel) tables as contiguous (A, C) tensors of x's accumulation type."""
    _check_chunk(chunk)
    dtype = accumulation_dtype(x.dtype)
    shape = (chunks(x.shape[0], chunk), x.shape[1])
    for table in tables:
        if table.dtype != dtype or tuple(table.shape) != shape:
            raise ValueError(f"tables must be {shape} {dtype} for a {x.dtype} view "
                             f"{tuple(x.shape)} with chunk {chunk}, got "
                             f"{tuple(table.shape)} {table.dtype}")
    return [table.contiguous() for table in tables]


def _dims(x: Tensor) -> tuple[int, ...]:
    """The view's sizes as ints: tile and grid sizes are bit arithmetic on them, which a
    symbolic size under torch.compile does not support (it specializes on them instead)."""
    return tuple(int(size) for size in x.shape)


def _tile(device: torch.device) -> int:
    return GPU_TILE if device.type == "cuda" and not interpreted() else INTERPRETER_TILE


def _blocks(channels: int, quantity: int, tile: int) -> tuple[int, int, int]:
    """(BP, BC, BQ): the tile's extent along the contiguous dim first (Q for NCHW views,
    C for channels-last ones), then along channels, then rows."""
    block_q = min(triton.next_power_of_2(quantity), tile)
    block_c = min(triton.next_power_of_2(channels), max(1, tile // block_q),
                  64 if quantity == 1 else tile)
    return max(1, tile // (block_q * block_c)), block_c, block_q


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda" or interpreted():
        return 1
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _channel_sums(x: Tensor, dy: Tensor | None, residual: Tensor | None,
                  tables: list[Tensor], chunk: int, activation: str, param: float
                  ) -> tuple[Tensor, Tensor]:
    """The two per-(chunk, channel) sums: statistics when ``dy`` is None, else backward."""
    _check_chunk(chunk)
    rows, channels, quantity = _dims(x)
    groups = chunks(rows, chunk)
    dtype = accumulation_dtype(x.dtype)
    first = x.new_empty((groups, channels), dtype=dtype)
    second = x.new_empty((groups, channels), dtype=dtype)
    if x.numel() == 0:
        fill = math.nan if dy is None else 0.0
        return first.fill_(fill), second.fill_(fill)
    block_p, block_c, block_q = _blocks(channels, quantity, _tile(x.device))
    chunk_rows = min(chunk, rows)
    c_blocks = triton.cdiv(channels, block_c)
    tiles = triton.cdiv(chunk_rows, block_p) * triton.cdiv(quantity, block_q)
    splits = max(1, min(triton.cdiv(_programs_target(x.device), groups * c_blocks),
                        tiles // MIN_TILES_PER_SPLIT))
    rows_per_split = triton.cdiv(triton.cdiv(chunk_rows, splits), block_p) * block_p
    splits = triton.cdiv(chunk_rows, rows_per_split)
    partials = x.new_empty((splits, 2, groups, channels), dtype=dtype)
    backward = dy is not None
    dy_ = dy if backward else x
    res = residual if residual is not None else x
    mean, scale, shift = tables if backward else (first, first, first)
    wrap_triton(channel_reduce_kernel)[(groups, c_blocks, splits)](
        x, dy_, res, mean, scale, shift, partials, rows, channels, quantity,
        chunk, rows_per_split, *x.stride(), *dy_.stride(), *res.stride(), param,
        BACKWARD=backward, HAS_RESIDUAL=residual is not None,
        ACTIVATION=_activation_code(activation), BP=block_p, BC=block_c, BQ=block_q)
    _finish(partials, first, second, None if backward else x, chunk)
    return first, second


def _finish(partials: Tensor, first: Tensor, second: Tensor, x: Tensor | None = None,
            chunk: int = 1) -> None:
    """first, second = the sums of ``partials (S, 2, *first.shape)``; with the view ``x``
    they are pivot sums, turned into the mean and variance of its chunks."""
    splits, tables = partials.shape[0], first.numel()
    block_s = min(triton.next_power_of_2(splits), 64)
    block_t = max(1, 1024 // block_s)
    rows, channels, quantity = _dims(x) if x is not None else (1, 1, 1)
    row_stride, channel_stride = x.stride()[:2] if x is not None else (0, 0)
    wrap_triton(finish_kernel)[(triton.cdiv(tables, block_t),)](
        partials, x if x is not None else partials, first, second, splits, tables, channels,
        rows, quantity, chunk, row_stride, channel_stride, STATS=x is not None, BS=block_s,
        BT=block_t)


def _channel_apply(x: Tensor, dy: Tensor | None, residual: Tensor | None,
                   tables: list[Tensor], chunk: int, activation: str, param: float
                   ) -> tuple[Tensor, Tensor | None]:
    """The elementwise pass: ``act(z [+ residual])``, or dx (and d residual) backward."""
    out = torch.empty_like(x)
    backward = dy is not None
    d_residual = torch.empty_like(residual) if backward and residual is not None else None
    if x.numel() == 0:
        return out, d_residual
    rows, channels, quantity = _dims(x)
    block_p, block_c, block_q = _blocks(channels, quantity, _tile(x.device))
    c_blocks, q_blocks = triton.cdiv(channels, block_c), triton.cdiv(quantity, block_q)
    grid = (triton.cdiv(rows, block_p) * c_blocks * q_blocks,)
    dy_ = dy if backward else x
    res = residual if residual is not None else x
    mean, scale, shift, *k = tables
    k1, k0, k2 = k if backward else (mean, mean, mean)
    wrap_triton(channel_apply_kernel)[grid](
        x, dy_, res, mean, scale, shift, k1, k0, k2, out,
        d_residual if d_residual is not None else out, rows, channels, quantity, chunk,
        c_blocks, q_blocks, *x.stride(), *dy_.stride(), *res.stride(), *out.stride(), param,
        BACKWARD=backward, HAS_RESIDUAL=residual is not None,
        ACTIVATION=_activation_code(activation), ONE_CHUNK=chunk >= rows, BP=block_p,
        BC=block_c, BQ=block_q)
    return out, d_residual


def _check_shape(name: str, x: Tensor, tensor: Tensor) -> None:
    if tensor.shape != x.shape:
        raise ValueError(f"{name} must have the view's shape {tuple(x.shape)}, got "
                         f"{tuple(tensor.shape)}")


def _channel_stats(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    return _channel_sums(x, None, None, [], chunk, "identity", 0.0)


def _channel_normalize(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, chunk: int,
                       activation: str, param: float) -> Tensor:
    return _channel_apply(x, None, None, _tables(x, chunk, mean, scale, shift), chunk, activation,
                          param)[0]


def _channel_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                             shift: Tensor, chunk: int, activation: str, param: float
                             ) -> tuple[Tensor, Tensor]:
    _check_shape("dy", x, dy)
    return _channel_sums(x, dy, None, _tables(x, chunk, mean, scale, shift), chunk, activation,
                         param)


def _channel_backward_input(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor,
                            shift: Tensor, k1: Tensor, k0: Tensor, k2: Tensor, chunk: int,
                            activation: str, param: float) -> Tensor:
    _check_shape("dy", x, dy)
    return _channel_apply(x, dy, None, _tables(x, chunk, mean, scale, shift, k1, k0, k2), chunk,
                          activation, param)[0]


def _channel_normalize_residual(x: Tensor, residual: Tensor, mean: Tensor, scale: Tensor,
                                shift: Tensor, chunk: int, activation: str, param: float
                                ) -> Tensor:
    _check_shape("residual", x, residual)
    return _channel_apply(x, None, residual, _tables(x, chunk, mean, scale, shift), chunk,
                          activation, param)[0]


def _channel_backward_reduce_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                      scale: Tensor, shift: Tensor, chunk: int,
                                      activation: str, param: float) -> tuple[Tensor, Tensor]:
    _check_shape("residual", x, residual)
    _check_shape("dy", x, dy)
    return _channel_sums(x, dy, residual, _tables(x, chunk, mean, scale, shift), chunk, activation,
                         param)


def _channel_backward_input_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                     scale: Tensor, shift: Tensor, k1: Tensor, k0: Tensor,
                                     k2: Tensor, chunk: int, activation: str, param: float
                                     ) -> tuple[Tensor, Tensor]:
    _check_shape("residual", x, residual)
    _check_shape("dy", x, dy)
    return _channel_apply(x, dy, residual, _tables(x, chunk, mean, scale, shift, k1, k0, k2), chunk,
                          activation, param)


def _row_blocks(x: Tensor) -> tuple[int, int]:
    """(BR, BK): whole rows per tile when they fit, else tile-wide pieces of one row."""
    tile = _tile(x.device)
    rows, width = _dims(x)
    block_k = min(triton.next_power_of_2(width), tile)
    return max(1, min(tile // block_k, triton.next_power_of_2(rows))), block_k


def _per_column(x: Tensor, **params: Tensor | None) -> list[Tensor | None]:
    """Optional per-column parameters of a rows view, contiguous, checked to be (K,)."""
    for name, param in params.items():
        if param is not None and tuple(param.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},) for rows of width "
                             f"{x.shape[1]}, got {tuple(param.shape)}")
    return [None if param is None else param.contiguous() for param in params.values()]


def _rows_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    x = x if x.stride(1) == 1 else x.contiguous()
    weight, bias = _per_column(x, weight=weight, bias=bias)
    rows, width = _dims(x)
    dtype = accumulation_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = x.new_empty(rows, dtype=dtype)
    invstd = x.new_empty(rows, dtype=dtype)
    if x.numel() == 0:
        return y, mean.fill_(math.nan), invstd.fill_(math.nan)
    block_r, block_k = _row_blocks(x)
    wrap_triton(rows_forward_kernel)[(triton.cdiv(rows, block_r),)](
        x, weight if weight is not None else x, bias if bias is not None else x, y, mean,
        invstd, rows, width, x.stride(0), y.stride(0), eps, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BR=block_r, BK=block_k)
    return y, mean, invstd


def _rows_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                   weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_shape("dy", x, dy)
    x = x if x.stride(1) == 1 else x.contiguous()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    (weight,) = _per_column(x, weight=weight)
    rows, width = _dims(x)
    dtype = accumulation_dtype(x.dtype)
    for name, stat in (("mean", mean), ("invstd", invstd)):
        if stat.dtype != dtype or tuple(stat.shape) != (rows,):
            raise ValueError(f"{name} must be ({rows},) {dtype} for a {x.dtype} rows view "
                             f"{(rows, width)}, got {tuple(stat.shape)} {stat.dtype}")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    sum_dy_xhat = x.new_empty(width, dtype=dtype)
    sum_dy = x.new_empty(width, dtype=dtype)
    if x.numel() == 0:
        return dx, sum_dy_xhat.zero_(), sum_dy.zero_()
    block_r, block_k = _row_blocks(x)
    programs = max(1, min(triton.cdiv(rows, block_r), _programs_target(x.device)))
    partials = x.new_zeros((programs, 2, width), dtype=dtype)
    wrap_triton(rows_backward_kernel)[(programs,)](
        dy, x, weight if weight is not None else x, mean.contiguous(), invstd.contiguous(), dx,
        partials, rows, width, dy.stride(0), x.stride(0), dx.stride(0),
        HAS_WEIGHT=weight is not None, ONE_BLOCK=block_k >= width, BR=block_r, BK=block_k)
    _finish(partials, sum_dy_xhat, sum_dy)
    return dx, sum_dy_xhat, sum_dy


if jit is not None:
    from torch._library.triton import set_wrap_triton_enabled
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def _launches_directly(x: Tensor) -> bool:
        """Whether a primitive's kernels may launch without its operator: a plain tensor,
        no tracing, no transform. The operator's Python dispatch costs ~35 us a call on the
        2-core machine, which on a GPU is more than a small layer's kernels."""
        return (not torch.compiler.is_compiling() and type(x) is Tensor
                and _get_current_dispatch_mode() is None
                and not torch._C._are_functorch_transforms_active())

    def _op(function):  # type: ignore[no-untyped-def]
        """Register ``function`` as the operator ``batchnorm_triton::<name without _>``;
        return the primitive, which launches directly where :func:`_launches_directly`
        allows and calls the operator otherwise (so tracers see it)."""
        name = function.__name__.lstrip("_")
        op = triton_op(f"batchnorm_triton::{name}", function, mutates_args=())

        def primitive(*args):  # type: ignore[no-untyped-def]
            if _launches_directly(args[0]):
                with set_wrap_triton_enabled(False):
                    return function(*args)
            return op(*args)

        primitive.__name__ = primitive.__qualname__ = name
        primitive.__doc__ = function.__doc__
        return primitive

    channel_stats = _op(_channel_stats)
    channel_normalize = _op(_channel_normalize)
    channel_backward_reduce = _op(_channel_backward_reduce)
    channel_backward_input = _op(_channel_backward_input)
    channel_normalize_residual = _op(_channel_normalize_residual)
    channel_backward_reduce_residual = _op(_channel_backward_reduce_residual)
    channel_backward_input_residual = _op(_channel_backward_input_residual)
    rows_forward = _op(_rows_forward)
    rows_backward = _op(_rows_backward)
