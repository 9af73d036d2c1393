"""What a normalization kernel needs to know besides its tensors."""

from __future__ import annotations

from dataclasses import dataclass

from batchnorm.core.activation import IDENTITY, Activation


@dataclass(frozen=True)
class NormSpec:
    """Statistics are reduced over ``reduce_dims`` of a canonical view of the input; the
    affine parameters are viewed with ``param_shape`` so that they broadcast against it."""

    reduce_dims: tuple[int, ...]
    param_shape: tuple[int, ...]
    eps: float
    activation: Activation = IDENTITY

    @property
    def param_dims(self) -> tuple[int, ...]:
        """Dims the parameter gradients are summed over (where a parameter broadcasts)."""
        return tuple(d for d, size in enumerate(self.param_shape) if size == 1)
