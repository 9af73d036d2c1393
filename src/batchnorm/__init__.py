"""Batch, layer, instance and group normalization for PyTorch.

Drop-in replacements for the ``torch.nn`` layers, exact to them, computed by one core
(statistics over the reduced axes of a canonical view, a statistics policy, one
autograd.Function) with fast CPU kernels behind a single dispatch point.
"""

from batchnorm import functional
from batchnorm.modules import *  # noqa: F403
from batchnorm.modules import __all__ as _modules_all

__version__ = "0.1.0"
__all__ = ["functional", *_modules_all]
