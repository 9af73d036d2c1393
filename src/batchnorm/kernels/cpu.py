"""The C++ CPU kernels (``torch.ops.batchnorm_cpu``), with :mod:`batchnorm.kernels.reference`'s
signatures and semantics: float32, float64, float16 and bfloat16 inputs (half types
accumulate in float32), statistics exact under a large common offset, results bitwise
independent of the number of threads. The extension is built at the first call
(:mod:`batchnorm.kernels.extension`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from batchnorm.kernels import extension

_NAMES = ("channel_stats", "channel_normalize", "channel_backward_reduce",
          "channel_backward_input", "channel_normalize_residual",
          "channel_backward_reduce_residual", "channel_backward_input_residual",
          "rows_forward", "rows_backward")
_ops: SimpleNamespace | None = None


def _kernels() -> SimpleNamespace:
    """The operators' overloads (calling one skips the packet's overload lookup)."""
    global _ops
    if _ops is None:
        extension.load()
        namespace = torch.ops.batchnorm_cpu
        _ops = SimpleNamespace(**{name: getattr(namespace, name).default for name in _NAMES})
    return _ops


def channel_stats(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    return _kernels().channel_stats(x, chunk)


def channel_normalize(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, chunk: int,
                      activation: str, param: float) -> Tensor:
    return _kernels().channel_normalize(x, mean, scale, shift, chunk, activation, param)


def channel_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                            chunk: int, activation: str, param: float
                            ) -> tuple[Tensor, Tensor]:
    return _kernels().channel_backward_reduce(dy, x, mean, scale, shift, chunk, activation,
                                              param)


def channel_backward_input(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                           k1: Tensor, k0: Tensor, k2: Tensor, chunk: int, activation: str,
                           param: float) -> Tensor:
    return _kernels().channel_backward_input(dy, x, mean, scale, shift, k1, k0, k2, chunk,
                                             activation, param)


def channel_normalize_residual(x: Tensor, residual: Tensor, mean: Tensor, scale: Tensor,
                               shift: Tensor, chunk: int, activation: str, param: float
                               ) -> Tensor:
    return _kernels().channel_normalize_residual(x, residual, mean, scale, shift, chunk,
                                                 activation, param)


def channel_backward_reduce_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                     scale: Tensor, shift: Tensor, chunk: int, activation: str,
                                     param: float) -> tuple[Tensor, Tensor]:
    return _kernels().channel_backward_reduce_residual(dy, x, residual, mean, scale, shift,
                                                       chunk, activation, param)


def channel_backward_input_residual(dy: Tensor, x: Tensor, residual: Tensor, mean: Tensor,
                                    scale: Tensor, shift: Tensor, k1: Tensor, k0: Tensor,
                                    k2: Tensor, chunk: int, activation: str, param: float
                                    ) -> tuple[Tensor, Tensor]:
    return _kernels().channel_backward_input_residual(dy, x, residual, mean, scale, shift, k1,
                                                      k0, k2, chunk, activation, param)


def rows_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().rows_forward(x, weight, bias, eps)


def rows_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().rows_backward(dy, x, mean, invstd, weight)
