"""BatchNorm layers: torch.nn's classes with the computation replaced by the core.

Subclassing the torch.nn classes keeps what users rely on exactly as torch has it:
constructor arguments and defaults, parameters, buffers, state_dict keys and
``_version`` migration, ``reset_parameters``, ``_check_input_dim`` errors and
``isinstance(m, torch.nn.BatchNorm2d)``. Each class adds
:meth:`_BatchNormForward.forward`, which decides the statistics policy exactly as
``torch.nn.modules.batchnorm._BatchNorm.forward`` does and calls
:func:`batchnorm.functional.batch_norm`, and the keyword-only variant options (fused
activation, ghost batches, Batch Renormalization), which leave the state_dict keys
unchanged (except ``renorm_mean``/``renorm_var`` with ``renorm_momentum``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.parameter import UninitializedBuffer, is_lazy

from batchnorm import functional as F
from batchnorm.core.activation import default_param, make_activation
from batchnorm.functional import batch_norm

# FX's symbolic tracing records the functional call as one node instead of tracing into
# its argument checks (which branch on shapes), as it does for torch.nn's layers.
torch.fx.wrap("batch_norm")

RenormClipping = Mapping[str, float] | Callable[[int], Mapping[str, float]]

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d",
           "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _BatchNormForward:
    """The training/eval policy of torch's ``_BatchNorm.forward`` on top of the core, and
    the variant options.

    Keyword-only options (all off by default):
      activation, activation_param: fused ``"relu" | "relu6" | "leaky_relu" | "elu" | "silu"``.
      ghost_batch_size: in training, each chunk of that many samples is normalized with its
        own statistics; the running statistics follow the pooled chunk statistics.
      renorm, renorm_clipping, renorm_momentum: Batch Renormalization; the clipping is a
        mapping with keys among rmax/rmin/dmax or a callable of the step (batches seen
        before this one) returning one; with ``renorm_momentum`` r and d are measured against
        buffers ``renorm_mean``/``renorm_var`` of their own instead of the running ones.
    """

    # Unannotated: torch.jit.script types module attributes by the class's annotations,
    # which it cannot read as strings (this module's annotations are), else by their values;
    # it reads class attributes only as constants.
    __constants__ = (*nn.modules.batchnorm._NormBase.__constants__, "axis", "activation",
                     "activation_param", "ghost_batch_size")
    axis = 1
    activation = None
    activation_param = None
    ghost_batch_size = None
    renorm = False
    renorm_clipping = None
    renorm_momentum = None

    def __init__(self, *args: Any, activation: str | None = None,
                 activation_param: float | None = None, ghost_batch_size: int | None = None,
                 renorm: bool = False, renorm_clipping: RenormClipping | None = None,
                 renorm_momentum: float | None = None, **kwargs: Any) -> None:
        make_activation(activation, activation_param)
        F.check_ghost_batch_size(ghost_batch_size)
        if not renorm and (renorm_clipping is not None or renorm_momentum is not None):
            raise ValueError("renorm_clipping and renorm_momentum need renorm=True")
        if renorm_clipping is not None and not callable(renorm_clipping):
            F._renorm_limits(renorm_clipping)
        if renorm_momentum is not None and not 0.0 < renorm_momentum <= 1.0:
            raise ValueError(f"renorm_momentum must be in (0, 1], got {renorm_momentum!r}")
        super().__init__(*args, **kwargs)
        if renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs running statistics to measure r and d "
                             "against, got track_running_stats=False")
        self.activation, self.activation_param = activation, activation_param
        self.ghost_batch_size = ghost_batch_size
        self.renorm, self.renorm_clipping = renorm, renorm_clipping
        self.renorm_momentum = renorm_momentum
        if renorm_momentum is not None:
            for name, running in (("renorm_mean", self.running_mean),
                                  ("renorm_var", self.running_var)):
                self.register_buffer(name, UninitializedBuffer(
                    device=running.device, dtype=running.dtype) if is_lazy(running)
                    else running.clone())

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if "renorm_mean" in self._buffers and not is_lazy(self.renorm_mean):
            self.renorm_mean.copy_(self.running_mean)
            self.renorm_var.copy_(self.running_var)

    def initialize_parameters(self, input: Tensor) -> None:
        """Lazy layers: the renorm buffers take their shape first, so that the lazy
        reset (skipped while any tensor is uninitialized) copies the running statistics."""
        if "renorm_mean" in self._buffers and is_lazy(self.renorm_mean):
            self.renorm_mean.materialize((input.shape[1],))
            self.renorm_var.materialize((input.shape[1],))
        super().initialize_parameters(input)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        """A checkpoint without renorm buffers (a plain layer's) starts them from its
        running statistics."""
        if "renorm_mean" in self._buffers:
            for name, running in (("renorm_mean", "running_mean"),
                                  ("renorm_var", "running_var")):
                if prefix + name not in state_dict and prefix + running in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + running]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def variant_options(self) -> dict[str, Any]:
        """The keyword-only options this layer was built with (for rebuilding it)."""
        return {"activation": self.activation, "activation_param": self.activation_param,
                "ghost_batch_size": self.ghost_batch_size, "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum}

    def _tensor(self, name: str) -> Tensor | None:
        """Parameter or buffer ``name``, read from the module's dicts as
        ``nn.Module.__getattr__`` reads it, but without first failing the ordinary attribute
        lookup (which builds an AttributeError: ~1.5 us per access, five per forward); one
        that is not there (a parametrization makes it a property) by ordinary lookup."""
        if name in self._parameters:
            return self._parameters[name]
        if name in self._buffers:
            return self._buffers[name]
        return getattr(self, name)

    def _statistics_policy(self) -> tuple[bool, Tensor | None, Tensor | None, Tensor | None]:
        """``(training, running_mean, running_var, num_batches_tracked)`` for the functional
        call: batch statistics in training, or in eval when there are no buffers; buffers are
        passed only when they are used or updated, and the batch is counted only when they
        are updated (torch's rule, also after ``track_running_stats`` is flipped on a built
        module)."""
        running_mean, running_var = self._tensor("running_mean"), self._tensor("running_var")
        if self.training:
            if self.track_running_stats:
                return True, running_mean, running_var, self._tensor("num_batches_tracked")
            return True, None, None, None
        return running_mean is None and running_var is None, running_mean, running_var, None

    def _batch_norm_options(self) -> dict[str, Any]:
        """Keyword options forwarded to the functional core (variants add theirs)."""
        options: dict[str, Any] = {"axis": self.axis, "activation": self.activation,
                                   "activation_param": self.activation_param,
                                   "ghost_batch_size": self.ghost_batch_size}
        if self.renorm and self.training:
            clipping = self.renorm_clipping
            if callable(clipping):
                clipping = clipping(int(self.num_batches_tracked))
            options.update(renorm=True, renorm_clipping=clipping)
            if self.renorm_momentum is not None:
                options.update(renorm_mean=self.renorm_mean, renorm_var=self.renorm_var,
                               renorm_momentum=self.renorm_momentum)
        return options

    def extra_repr(self) -> str:
        options = {name: value for name, value in self.variant_options().items()
                   if value is not None and value is not False}
        return ", ".join([super().extra_repr(),
                          *(f"{name}={value!r}" for name, value in options.items())])

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(input))``, or with ``residual`` ``act(BN(input) + residual)`` in one
        operator (a ResNet block's tail: ``bn2(conv2(h), shortcut)``)."""
        if torch.jit.is_scripting():
            return self._scripted_forward(input, residual)
        return self._forward(input, residual)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles :meth:`_scripted_forward`, which has no form for
        Batch Renormalization (its clipping may be a Python callable)."""
        if self.renorm:
            raise RuntimeError(f"torch.jit.script: {type(self).__name__} with renorm=True "
                               "has no TorchScript form; use torch.jit.trace, torch.export "
                               "or torch.compile")
        return self

    def _scripted_forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """:meth:`forward` in TorchScript's subset of Python: the statistics policy of
        :meth:`_statistics_policy` and the operator :func:`batch_norm` would call, so a
        scripted layer (saved, it needs ``import batchnorm`` before ``torch.jit.load``)
        computes what the eager one does."""
        self._check_input_dim(input)
        axis = self.axis if self.axis >= 0 else self.axis + input.dim()
        training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean
        running_var = self.running_var
        num_batches_tracked: Tensor | None = None
        if self.training and not self.track_running_stats:
            running_mean = None
            running_var = None
        elif self.training:
            num_batches_tracked = self.num_batches_tracked
        chunk = 0
        ghost_batch_size = self.ghost_batch_size
        if training:
            if input.numel() // max(input.size(axis), 1) == 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {input.size()}")
            if ghost_batch_size is not None and input.size(0) > 0:
                F.check_ghost_batches(input.size(0), ghost_batch_size, axis)
                chunk = ghost_batch_size
        activation = "identity" if self.activation is None else self.activation
        param = self.activation_param
        if param is None:
            param = default_param(activation)
        if residual is None:
            return torch.ops.batchnorm.batch_norm(
                input, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
                training, self.momentum, self.eps, axis, chunk, activation, param)[0]
        return torch.ops.batchnorm.batch_norm_add(
            input, residual, self.weight, self.bias, running_mean, running_var,
            num_batches_tracked, training, self.momentum, self.eps, axis, chunk, activation,
            param)[0]

    @torch.jit.unused
    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        if not is_fx_symbolic_tracing():
            self._check_input_dim(input)
        training, running_mean, running_var, num_batches_tracked = self._statistics_policy()
        return batch_norm(input, running_mean, running_var, self._tensor("weight"),
                          self._tensor("bias"), training, self.momentum, self.eps,
                          num_batches_tracked=num_batches_tracked, residual=residual,
                          **self._batch_norm_options())


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
                 dtype: torch.dtype | None = None, *, bias: bool = True, axis: int = 1,
                 **options: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, **options)
        self.axis = axis

    def _check_input_dim(self, input: Tensor) -> None:
        needed = max(2, self.axis + 1 if self.axis >= 0 else -self.axis)
        if input.dim() < needed:
            raise ValueError(f"expected at least {needed}D input for axis={self.axis} "
                             f"(got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"
