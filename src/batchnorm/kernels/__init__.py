"""The one dispatch point between the core and the kernels.

:func:`primitives` picks, for an input tensor, the module whose kernel primitives (the
functions of :mod:`batchnorm.kernels.reference`) run it: the compiled C++ kernels on CPU,
the Triton kernels on CUDA, and the plain-torch reference for anything else or when a
compiled backend is unavailable. :func:`native` says whether the plain layers instead run
on torch's own ATen kernels (:mod:`batchnorm.ops.native`): only where ``aten`` is forced,
since on a GPU those miss the float64 bars under a large mean offset that ours meet.
``BATCHNORM_BACKEND`` (read once, at import) or :func:`use_backend` forces one: ``torch``
(the reference everywhere), ``cpp``, ``triton`` (also on CPU tensors when
``TRITON_INTERPRET=1``, for testing the kernels without a GPU) or ``aten`` (the plain
layers on torch's kernels on any device, the variants on the device's primitives). The
compiled C++ operators, which otherwise take the operators' CPU calls whole, hand them to
the composite implementation while ``torch``, ``triton`` or ``aten`` is forced.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from batchnorm.kernels import extension, reference

BACKENDS = ("torch", "cpp", "triton", "aten")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _parse(choice: str | None) -> str | None:
    choice = (choice or "").strip().lower() or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"BATCHNORM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def _force(choice: str | None) -> None:
    global _forced
    _forced = choice
    extension.run_composite_operators(choice in ("torch", "triton", "aten"))


_forced: str | None = None
_force(_parse(os.environ.get("BATCHNORM_BACKEND")))


def forced_backend() -> str | None:
    """The backend forced by ``BATCHNORM_BACKEND`` or :func:`use_backend`, else None."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` (None: the default choice) inside the block."""
    previous = _forced
    _force(_parse(name))
    try:
        yield
    finally:
        _force(previous)


@functools.cache
def _cpp() -> ModuleType | None:
    from batchnorm.kernels import cpu
    return cpu if extension.available() else None


@functools.cache
def _triton(device_type: str) -> ModuleType | None:
    try:
        from batchnorm.kernels import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.available(device_type) else None


def primitives(x: torch.Tensor) -> ModuleType:
    """The kernel primitives for tensor ``x``."""
    if _forced == "torch" or x.dtype not in _FLOAT_DTYPES:
        return reference
    device = x.device.type
    if _forced == "triton" or (_forced in (None, "aten") and device == "cuda"):
        return _triton(device) or reference
    if device == "cpu":
        return _cpp() or reference
    return reference


def native() -> bool:
    """Whether plain BatchNorm/InstanceNorm/GroupNorm/LayerNorm run on torch's own kernels
    (:mod:`batchnorm.ops.native` also checks that they can): when ``aten`` is forced, on any
    device."""
    return _forced == "aten"
