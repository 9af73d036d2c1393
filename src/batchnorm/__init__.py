"""Batch, layer, instance and group normalization for PyTorch.

Drop-in replacements for the ``torch.nn`` layers, exact to them, computed by one core
(statistics over the reduced axes of a canonical view, a statistics policy, one
autograd.Function) with fast CPU kernels behind a single dispatch point.
"""

from batchnorm import functional, keras
from batchnorm.modules import *  # noqa: F403
from batchnorm.modules import __all__ as _modules_all
from batchnorm.tools import Finding, doctor, fold, recalibrate

__version__ = "0.1.0"
__all__ = [
    "Finding", "doctor", "fold", "functional", "keras", "recalibrate", *_modules_all,
]
