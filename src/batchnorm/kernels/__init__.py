"""The one dispatch point between the core and the kernels.

``BATCHNORM_BACKEND=torch`` forces the pure-torch reference everywhere; ``numba`` forces the
CPU kernels wherever they apply. Unset, each call takes the CPU kernel when one exists for
its view and dtype and the rule in :func:`batchnorm.kernels.numba_cpu.prefers` says it is
faster than torch there, else the reference. A backend may also fuse the statistics into
the normalize step and the whole backward into one call (:func:`fused`).
"""

from __future__ import annotations

import os
from types import ModuleType

from torch import Tensor

from batchnorm.core.spec import NormSpec
from batchnorm.kernels import numba_cpu, reference

BACKENDS = ("torch", "numba")


def forced_backend() -> str | None:
    choice = os.environ.get("BATCHNORM_BACKEND", "").strip().lower() or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"BATCHNORM_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def select(x: Tensor, spec: NormSpec) -> ModuleType:
    """The backend module that runs ``spec`` on view ``x``."""
    choice = forced_backend()
    if choice == "torch" or not numba_cpu.supports(x, spec):
        return reference
    if choice == "numba" or numba_cpu.prefers(x, spec):
        return numba_cpu
    return reference


def fused(x: Tensor, spec: NormSpec) -> ModuleType | None:
    """The backend that computes batch statistics, normalization and the whole backward of
    view ``x`` in one call each (``forward_batch``/``backward_batch``), or None."""
    backend = select(x, spec)
    fuses = getattr(backend, "fuses", None)
    return backend if fuses is not None and fuses(x, spec) else None
