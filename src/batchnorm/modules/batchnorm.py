"""BatchNorm layers: torch.nn's classes with the computation replaced by the core.

Subclassing the torch.nn classes keeps what users rely on exactly as torch has it:
constructor arguments and defaults, parameters, buffers, state_dict keys and
``_version`` migration, ``reset_parameters``, ``_check_input_dim`` errors and
``isinstance(m, torch.nn.BatchNorm2d)``. The only thing each class adds is
:meth:`_BatchNormForward.forward`, which decides the statistics policy exactly as
``torch.nn.modules.batchnorm._BatchNorm.forward`` does and calls
:func:`batchnorm.functional.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import functional as F

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
           "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _BatchNormForward:
    """The training/eval policy of torch's ``_BatchNorm.forward`` on top of the core."""

    axis: int = 1

    def _momentum_factor(self) -> float:
        """Counts the batch and returns this step's running-average factor: ``momentum``,
        or ``1 / num_batches_tracked`` (cumulative average) when ``momentum`` is None."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def _statistics_policy(self) -> tuple[bool, Tensor | None, Tensor | None]:
        """Batch statistics in training, or in eval when there are no buffers; buffers are
        passed only when they are used or updated (torch's rule, also after
        ``track_running_stats`` is flipped on a built module)."""
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        return (use_batch_stats, self.running_mean if pass_buffers else None,
                self.running_var if pass_buffers else None)

    def _batch_norm_options(self) -> dict[str, Any]:
        """Keyword options forwarded to the functional core (variants add theirs)."""
        return {"axis": self.axis}

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self._momentum_factor()
        use_batch_stats, running_mean, running_var = self._statistics_policy()
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                            use_batch_stats, factor, self.eps, **self._batch_norm_options())


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on (N, C, H, W), NCHW or channels_last."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on (N, C, D, H, W), also channels_last_3d."""


class LazyBatchNorm1d(_BatchNormForward, nn.LazyBatchNorm1d):
    """:class:`torch.nn.LazyBatchNorm1d` that becomes :class:`BatchNorm1d`."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, nn.LazyBatchNorm2d):
    """:class:`torch.nn.LazyBatchNorm2d` that becomes :class:`BatchNorm2d`."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, nn.LazyBatchNorm3d):
    """:class:`torch.nn.LazyBatchNorm3d` that becomes :class:`BatchNorm3d`."""

    cls_to_become = BatchNorm3d


class BatchNorm(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    """Batch normalization of channel ``axis`` of an input of any rank >= 2.

    ``axis=-1`` normalizes TensorFlow-layout (N, ..., C) input in place of a
    permute-BatchNorm-permute sandwich: the core reads channels-last memory directly.
    Parameters, buffers and state_dict keys are those of ``torch.nn.BatchNorm*d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True, axis: int = 1) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.axis = axis

    def _check_input_dim(self, input: Tensor) -> None:
        needed = max(2, self.axis + 1 if self.axis >= 0 else -self.axis)
        if input.dim() < needed:
            raise ValueError(f"expected at least {needed}D input for axis={self.axis} "
                             f"(got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"
