"""``BatchNormalization`` with tf_keras 2.21 semantics, as a lazily built torch module.

Training normalizes with the batch statistics of every dim but ``axis`` through the
library's operator (:func:`batchnorm.ops.batch_norm`, analytic backward), without affine
parameters; the Keras extras only change what is applied after it and what is stored:

* moving averages follow Keras: ``moving -= (moving - batch) * (1 - momentum)``;
* the fused path (rank 4/5, channel axis 1 or last, no renorm / virtual batch /
  adjustment) stores the unbiased variance ``var * n / (n - 1)`` like ``FusedBatchNormV3``,
  otherwise the biased variance. Its epsilon is used as given: TF 2.21's CPU kernel does
  not raise it to 1.001e-5 (TF 1.x did, in Python; the golden vectors pin this down);
* renorm and adjustment apply to the normalized ``x_hat``: ``(x_hat * r + d) * gamma +
  beta`` with ``r``, ``d`` constants;
* a virtual batch of size V reshapes the batch B to ``(V, B / V)`` like TF, so ghost batch
  ``j`` holds samples ``j, j + B/V, j + 2B/V, ...``: the batch is reordered so that each
  ghost batch is V consecutive samples, the operator's chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy
from torch.utils.hooks import RemovableHandle

from batchnorm import functional, ops
from batchnorm.keras import options

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
Adjustment = Callable[[torch.Size], tuple[Tensor, Tensor]]


def _interleave(x: Tensor, groups: int) -> Tensor:
    """Samples ``j, j + groups, j + 2 * groups, ...`` made consecutive, for each j; applied
    with ``groups = B / V`` it gathers TF's virtual batches, with ``groups = V`` it undoes
    that."""
    return x.reshape(-1, groups, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _check_number(name: str, value: float, low: float, high: float, *,
                  low_open: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not ((low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


class BatchNormalization(LazyModuleMixin, nn.Module):
    """``tf.keras.layers.BatchNormalization`` (tf_keras 2.21) for torch tensors.

    Parameters (``gamma``, ``beta``) and buffers (``moving_mean``, ``moving_variance``,
    with renorm also ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``), all of shape
    ``[C]``, take their shape and values on the first call (or :meth:`build`), on the
    input's device and in its dtype (float32 for half precision). Until then they are
    torch's uninitialized lazy tensors, as in ``torch.nn.LazyBatchNorm2d``: an optimizer
    created before the first call holds the very parameters it will train.

    ``layer(x, training=None)``: ``None`` follows the module mode (``.train()`` /
    ``.eval()``), which is what Keras's ``fit`` / ``predict`` pass; ``True`` / ``False``
    override it, and ``trainable=False`` always means inference, as in Keras.
    """

    def __init__(self, axis: int | Sequence[int] = -1, momentum: float = 0.99,
                 epsilon: float = 1e-3, center: bool = True, scale: bool = True,
                 beta_initializer: options.Initializer = "zeros",
                 gamma_initializer: options.Initializer = "ones",
                 moving_mean_initializer: options.Initializer = "zeros",
                 moving_variance_initializer: options.Initializer = "ones",
                 beta_regularizer: options.Regularizer = None,
                 gamma_regularizer: options.Regularizer = None,
                 beta_constraint: options.Constraint = None,
                 gamma_constraint: options.Constraint = None,
                 renorm: bool = False, renorm_clipping: dict[str, float] | None = None,
                 renorm_momentum: float = 0.99, fused: bool | None = None,
                 trainable: bool = True, virtual_batch_size: int | None = None,
                 adjustment: Adjustment | None = None) -> None:
        super().__init__()
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(f"axis must be one int (one channel axis), got {axis!r}")
            axis = axis[0]
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {axis!r}")
        _check_number("momentum", momentum, 0.0, 1.0)
        _check_number("renorm_momentum", renorm_momentum, 0.0, 1.0)
        _check_number("epsilon", epsilon, 0.0, math.inf, low_open=True)
        if virtual_batch_size is not None and (isinstance(virtual_batch_size, bool) or
                                               not isinstance(virtual_batch_size, int) or
                                               virtual_batch_size <= 0):
            raise ValueError("virtual_batch_size must be a positive int dividing the batch "
                             f"size, got {virtual_batch_size!r}")
        if virtual_batch_size is not None and adjustment is not None:
            raise ValueError("adjustment cannot be given together with virtual_batch_size "
                             "(as in Keras), got both")
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"adjustment must be a callable shape -> (scale, bias), got "
                            f"{type(adjustment).__name__}")
        clipping = dict(renorm_clipping or {})
        unknown = sorted(set(clipping) - set(RENORM_CLIPPING_KEYS))
        if unknown:
            raise ValueError(f"renorm_clipping keys must be among {RENORM_CLIPPING_KEYS}, "
                             f"got {unknown}")
        fused_blockers = [name for name, given in (
            ("renorm", renorm), ("virtual_batch_size", virtual_batch_size is not None),
            ("adjustment", adjustment is not None),
            ("axis", axis not in (-4, -3, -1, 1, 3, 4))) if given]
        if fused and fused_blockers:
            raise ValueError(f"fused=True cannot be used with {', '.join(fused_blockers)}: "
                             "it needs no renorm, virtual_batch_size or adjustment and axis "
                             f"1 or 3 (4D) / 1 or 4 (5D), got axis={axis}")
        self.axis, self.momentum, self.epsilon = axis, float(momentum), float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.initializers = {"gamma": gamma_initializer, "beta": beta_initializer,
                             "moving_mean": moving_mean_initializer,
                             "moving_variance": moving_variance_initializer}
        self.regularizers = {"gamma": options.regularizer("gamma_regularizer",
                                                          gamma_regularizer),
                             "beta": options.regularizer("beta_regularizer", beta_regularizer)}
        self.constraints = {"gamma": options.constraint("gamma_constraint", gamma_constraint),
                            "beta": options.constraint("beta_constraint", beta_constraint)}
        self.renorm, self.renorm_clipping = bool(renorm), clipping
        self.renorm_momentum = float(renorm_momentum)
        self.fused: bool | None = False if fused is None and fused_blockers else fused
        self.virtual_batch_size, self.adjustment = virtual_batch_size, adjustment
        self._trainable = bool(trainable)
        self.built = False
        self.gamma = UninitializedParameter(requires_grad=self._trainable) if self.scale \
            else None
        self.beta = UninitializedParameter(requires_grad=self._trainable) if self.center \
            else None
        for name in self.weight_names:
            if name not in ("gamma", "beta"):
                self.register_buffer(name, UninitializedBuffer())

    # -- building ---------------------------------------------------------------------------
    def build(self, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> None:
        """Create the weights for inputs of ``input_shape`` (Keras's ``build``); tensors
        already given values by ``load_state_dict`` keep them."""
        if self.built:
            raise RuntimeError("build(): the layer is already built; its weights exist")
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis must be in [{-rank}, {rank - 1}] for a {rank}D input, "
                             f"got {self.axis}")
        axis = self.axis % rank
        if self.virtual_batch_size is not None and axis == 0:
            raise ValueError("axis cannot be 0 (the batch dim) with virtual_batch_size, "
                             f"got axis={self.axis}")
        if self.fused is None:
            self.fused = rank in (4, 5) and dtype != torch.float64
        elif self.fused and (rank not in (4, 5) or dtype == torch.float64):
            raise ValueError("fused=True needs a 4D or 5D float16/bfloat16/float32 input, "
                             f"got {rank}D {dtype}")
        if self.fused and axis not in (1, rank - 1):
            if rank == 4:
                raise ValueError(f"fused needs axis 1 or 3 for 4D input, got axis={self.axis}")
            self.fused = False
        channels = input_shape[axis]
        self._axis, self._rank = axis, rank
        device = torch.device("cpu") if device is None else torch.device(device)
        initial = {name: options.initial_value(f"{name}_initializer", self.initializers[name],
                                               (channels,), dtype, device)
                   for name in ("gamma", "beta", "moving_mean", "moving_variance")}
        stddev = initial["moving_variance"].sqrt()
        initial.update(moving_stddev=stddev, renorm_mean=initial["moving_mean"],
                       renorm_stddev=stddev)
        for name in self.weight_names:
            tensor = getattr(self, name)
            if is_lazy(tensor):
                tensor.materialize((channels,), device=device, dtype=dtype)
                with torch.no_grad():
                    tensor.copy_(initial[name])
            elif tensor.shape != (channels,):
                raise ValueError(f"{name} was loaded with shape {list(tensor.shape)}, but an "
                                 f"input of shape {list(input_shape)} has {channels} channels "
                                 f"on axis {self.axis}")
        self.built = True

    def initialize_parameters(self, x: Tensor, training: bool | None = None) -> None:
        """The lazy-module hook before the first forward: build for ``x``."""
        if not self.built:
            _check_floating(x)
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            self.build(x.shape, dtype=dtype, device=x.device)

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        """Freezing stops gradients to gamma/beta and forces inference (Keras >= 2.0)."""
        self._trainable = bool(value)
        for param in (self.gamma, self.beta):
            if param is not None:
                param.requires_grad_(self._trainable)

    # -- Keras weight API ----------------------------------------------------------------------
    @property
    def weight_names(self) -> list[str]:
        """Keras's ``layer.weights`` order."""
        names = [n for n, on in (("gamma", self.scale), ("beta", self.center)) if on]
        names += ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return names

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise RuntimeError(f"{what} needs the layer built: call it once or call build()")

    def get_weights(self) -> list[np.ndarray]:
        """The weights as numpy arrays, in Keras's order (see :attr:`weight_names`)."""
        self._require_built("get_weights()")
        return [getattr(self, n).detach().cpu().numpy().copy() for n in self.weight_names]

    @torch.no_grad()
    def set_weights(self, weights: Iterable[object]) -> None:
        """Assign weights given in Keras's order; Keras's ``[1, ..., C, ...]`` shapes of a
        virtual-batch layer are accepted and stored as ``[C]``."""
        self._require_built("set_weights()")
        weights = list(weights)
        names = self.weight_names
        if len(weights) != len(names):
            raise ValueError(f"set_weights expects {len(names)} arrays ({', '.join(names)}), "
                             f"got {len(weights)}")
        for name, value in zip(names, weights, strict=True):
            target = getattr(self, name)
            value = torch.as_tensor(np.asarray(value))
            if value.numel() != target.numel() or sum(s != 1 for s in value.shape) > 1:
                raise ValueError(f"set_weights: {name} must have shape {list(target.shape)}, "
                                 f"got {list(value.shape)}")
            target.copy_(value.reshape(target.shape))

    @property
    def losses(self) -> list[Tensor]:
        """Regularization penalties of the current gamma and beta (Keras ``layer.losses``);
        add ``sum(layer.losses)`` to the training loss."""
        return [regularize(param) for name, param in (("gamma", self.gamma),
                                                      ("beta", self.beta))
                if param is not None and not is_lazy(param)
                and (regularize := self.regularizers[name]) is not None]

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project gamma and beta with their constraints, as Keras does after each
        optimizer update; :meth:`constrain_after` calls it automatically."""
        for name, param in (("gamma", self.gamma), ("beta", self.beta)):
            project = self.constraints[name]
            if param is not None and not is_lazy(param) and project is not None:
                param.copy_(project(param))

    def constrain_after(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Apply the constraints after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.apply_constraints())

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, training: bool | None = None) -> Tensor:
        _check_floating(x)
        if x.dim() != self._rank or x.shape[self._axis] != self.moving_mean.numel():
            raise ValueError(f"input must be {self._rank}D with {self.moving_mean.numel()} "
                             f"channels on axis {self.axis}, got shape {list(x.shape)}")
        training = self.training if training is None else bool(training)
        if not self._trainable or not training:
            return self._inference(x)
        return self._train(x)

    def _inference(self, x: Tensor) -> Tensor:
        return functional.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma,
                                     self.beta, False, 0.0, self.epsilon, axis=self._axis)

    def _train(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if x.numel() == 0:
            raise ValueError(f"training needs a non-empty batch, got input shape {list(x.shape)}")
        virtual = self.virtual_batch_size
        if virtual is not None:
            if batch % virtual:
                raise ValueError(f"virtual_batch_size must divide the batch size {batch}, "
                                 f"got {virtual}")
            x = _interleave(x, batch // virtual)
        count = x.numel() // x.shape[self._axis] // (batch // virtual if virtual else 1)
        if count < 2 and self.fused:
            raise ValueError("the fused path needs more than 1 value per channel in "
                             f"training (Bessel's correction), got input shape {list(x.shape)}")
        normalized, mean, var, _, _ = ops.batch_norm(x, None, None, None, None, None, True,
                                                     None, self.epsilon, self._axis,
                                                     virtual or 0)
        # one value per channel for the moving statistics: the mean over ghost batches
        new_mean, new_var = mean.mean(0), var.mean(0)
        shape = [1] * x.dim()
        shape[self._axis] = x.shape[self._axis]
        y = normalized
        if self.renorm:
            r, d = self._renorm_correction(new_mean, new_var)
            y = y * r.reshape(shape) + d.reshape(shape)
        self._update_moving_statistics(new_mean, new_var, count)
        if virtual is not None:
            y = _interleave(y, virtual)
        y = self._adjust(y) if self.adjustment is not None else self._affine(y, shape)
        return y.to(normalized.dtype)

    def _affine(self, y: Tensor, shape: list[int]) -> Tensor:
        if self.gamma is not None:
            y = y * self.gamma.reshape(shape)
        if self.beta is not None:
            y = y + self.beta.reshape(shape)
        return y

    def _adjust(self, normalized: Tensor) -> Tensor:
        """``(normalized * adj_scale + adj_bias) * gamma + beta`` in the input's layout."""
        adj_scale, adj_bias = self.adjustment(normalized.shape)
        shape = [1] * normalized.dim()
        shape[self._axis] = normalized.shape[self._axis]
        return self._affine(normalized * adj_scale + adj_bias, shape)

    @torch.no_grad()
    def _renorm_correction(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Batch renorm's ``r = sigma_B / s``, ``d = (mu_B - renorm_mean) / s`` with
        ``s = max(renorm_stddev, sqrt(eps))``, clipped; updates the renorm averages."""
        stddev = torch.sqrt(var + self.epsilon)
        renorm_stddev = torch.clamp(self.renorm_stddev, min=math.sqrt(self.epsilon))
        r = stddev / renorm_stddev
        d = (mean - self.renorm_mean) / renorm_stddev
        clip = self.renorm_clipping
        if "rmin" in clip:
            r = torch.clamp(r, min=clip["rmin"])
        if "rmax" in clip:
            r = torch.clamp(r, max=clip["rmax"])
        if "dmax" in clip:
            d = torch.clamp(d, min=-clip["dmax"], max=clip["dmax"])
        _assign_moving_average(self.renorm_mean, mean, self.renorm_momentum)
        _assign_moving_average(self.renorm_stddev, stddev, self.renorm_momentum)
        return r.to(self.moving_mean.dtype), d.to(self.moving_mean.dtype)

    @torch.no_grad()
    def _update_moving_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        _assign_moving_average(self.moving_mean, mean, self.momentum)
        if self.renorm:
            _assign_moving_average(self.moving_stddev, torch.sqrt(var + self.epsilon),
                                   self.momentum)
            self.moving_variance.copy_(torch.relu(self.moving_stddev.square() - self.epsilon))
        elif self.fused:
            _assign_moving_average(self.moving_variance, var * (count / (count - 1)),
                                   self.momentum)
        else:
            _assign_moving_average(self.moving_variance, var, self.momentum)

    def extra_repr(self) -> str:
        extras = [f"axis={self.axis}", f"momentum={self.momentum}", f"epsilon={self.epsilon}",
                  f"fused={self.fused}"]
        if self.renorm:
            extras.append(f"renorm_clipping={self.renorm_clipping}")
        if self.virtual_batch_size is not None:
            extras.append(f"virtual_batch_size={self.virtual_batch_size}")
        return ", ".join(extras)


def _check_floating(x: Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"BatchNormalization expects a floating point input, got {x.dtype}")


def _assign_moving_average(moving: Tensor, value: Tensor, momentum: float) -> None:
    """Keras's update ``moving -= (moving - value) * (1 - momentum)``."""
    moving.sub_((moving - value.to(moving.dtype)) * (1.0 - momentum))
