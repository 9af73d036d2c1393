"""Synchronized BatchNorm: statistics of the global batch across processes, on CPU and GPU.

Training-mode layers normalize with the mean and variance of the batch of every process
in the group (see :mod:`batchnorm.distributed` for the one collective per forward and
per backward); the running statistics are then those a single process would keep for the
concatenated batch. Eval mode, a world of one process, or no initialized process group
run the local layer with no communication.

Unlike :class:`torch.nn.SyncBatchNorm` this works on CPU tensors (gloo), with uneven and
empty per-process batches, and can be reverted to a plain layer. It checks once (per
input channels and dtype) that every process feeds the same channels and dtype, raising
on every process instead of merging unrelated statistics, and waits for the other
processes at most ``timeout`` seconds (default 30) instead of the process group's 30
minutes, so a process left in eval mode fails fast with an error saying so. It deliberately does
not subclass ``torch.nn.SyncBatchNorm``: DistributedDataParallel rejects every instance
of that class on CPU modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from batchnorm.distributed import ProcessGroupReducer, sync_world_size
from batchnorm.modules.batchnorm import BatchNorm, _BatchNormForward
from batchnorm.modules.convert import _swap

__all__ = ["DEFAULT_TIMEOUT_S", "SyncBatchNorm", "convert_sync_batchnorm",
           "revert_sync_batchnorm"]

_BatchNormBase = nn.modules.batchnorm._BatchNorm
DEFAULT_TIMEOUT_S = 30.0  # a step's collectives normally meet within seconds
_AGREED = "_agreed_input"  # (channels, dtype) the processes were checked to agree on


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got "
                         f"{timeout!r}")
    return float(timeout)


class SyncBatchNorm(_BatchNormForward, _BatchNormBase):
    """:class:`torch.nn.SyncBatchNorm`'s arguments, parameters and state_dict keys, for
    input of any rank >= 2 (channel axis 1), NCHW or channels-last, CPU or CUDA.

    ``variant_options`` are those of :class:`batchnorm.BatchNorm2d`: ``renorm`` measures
    r and d with the global batch statistics; ``ghost_batch_size`` chunks each process's
    own batch, so those layers normalize locally and do not communicate at all (their
    running statistics then differ between processes unless DDP broadcasts buffers).

    ``timeout``: seconds each collective waits for the other processes (None: the process
    group's timeout); with NCCL a finite timeout makes the CPU wait for the collective."""

    timeout: float | None = DEFAULT_TIMEOUT_S

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: dist.ProcessGroup | None = None, device: Any = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True,
                 timeout: float | None = DEFAULT_TIMEOUT_S, **variant_options: Any) -> None:
        timeout = _check_timeout(timeout)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, **variant_options)
        self.process_group = process_group
        self.timeout = timeout

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @property
    def layer_name(self) -> str:
        """How errors name this layer: its qualified name in the model once
        :func:`convert_sync_batchnorm` has seen it, else class and feature count."""
        return self.__dict__.get("_qualified_name") or \
            f"{type(self).__name__}({self.num_features})"

    def _synchronizes(self) -> bool:
        return self.training and self.ghost_batch_size is None and \
            sync_world_size(self.process_group) > 1

    def _reducer(self) -> ProcessGroupReducer:
        return ProcessGroupReducer(self.process_group, self.layer_name, self.timeout)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("torch.jit.script: SyncBatchNorm has no TorchScript form (nor has "
                           "torch.nn.SyncBatchNorm); script a model with BatchNorm layers, or "
                           "use torch.jit.trace, torch.export or torch.compile")

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """Before the first synchronized step with these channels and dtype, check that
        every process agrees on them (one small collective, not one per step)."""
        self._check_input_dim(input)
        if self._synchronizes() and self.__dict__.get(_AGREED) != (input.shape[1],
                                                                    input.dtype):
            self._reducer().check_inputs_agree(input)
            self.__dict__[_AGREED] = (input.shape[1], input.dtype)
        return super().forward(input, residual)

    def _batch_norm_options(self) -> dict[str, Any]:
        options = super()._batch_norm_options()
        if self._synchronizes():
            options["reducer"] = self._reducer()
        return options


def _convert(module: nn.Module, process_group: dist.ProcessGroup | None,
             timeout: float | None, name: str) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        module.process_group, module.timeout = process_group, timeout
        module.__dict__.pop(_AGREED, None)  # a new group checks again
        if name:  # the root module has no name of its own
            module._qualified_name = f"SyncBatchNorm '{name}'"
        return module
    if isinstance(module, _BatchNormBase):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
                module.has_uninitialized_params():
            raise ValueError(f"convert_sync_batchnorm: module '{name}' is an uninitialized "
                             f"{type(module).__name__}; expected a layer that knows its "
                             "num_features (run one forward pass before converting)")
        synced = _swap(module, SyncBatchNorm)
        synced._converted_from = type(module)
        return _convert(synced, process_group, timeout, name)
    for child_name, child in module.named_children():
        replacement = _convert(child, process_group, timeout,
                               f"{name}.{child_name}" if name else child_name)
        if replacement is not child:
            setattr(module, child_name, replacement)
    return module


def convert_sync_batchnorm(module: nn.Module,
                           process_group: dist.ProcessGroup | None = None, *,
                           timeout: float | None = DEFAULT_TIMEOUT_S) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` (torch.nn's, ours, torch.nn.SyncBatchNorm)
    by :class:`SyncBatchNorm` on ``process_group`` (default: the world) with ``timeout``,
    in place.

    The new layers share the originals' parameter and buffer tensors (an optimizer built
    before keeps working) and their train/eval mode, and remember their qualified names
    for error messages. Returns the module (a new object only when it is itself a BN)."""
    return _convert(module, process_group, _check_timeout(timeout), "")


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`, in place: each :class:`SyncBatchNorm` becomes the
    class it was converted from, or :class:`batchnorm.BatchNorm` (local, any rank, the same
    state_dict keys) when it was built directly; tensors and mode are shared as in
    conversion. Returns the module (a new object only when it is itself a SyncBatchNorm)."""
    if isinstance(module, SyncBatchNorm):
        cls = module.__dict__.get("_converted_from", BatchNorm)
        local = _swap(module, cls)
        dropped = ["_qualified_name", "_converted_from", _AGREED, "timeout"]
        if not issubclass(cls, nn.SyncBatchNorm):
            dropped.append("process_group")
        for attribute in dropped:
            local.__dict__.pop(attribute, None)
        return local
    for child_name, child in module.named_children():
        replacement = revert_sync_batchnorm(child)
        if replacement is not child:
            setattr(module, child_name, replacement)
    return module
