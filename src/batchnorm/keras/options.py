"""Keras-style initializers, regularizers and constraints: a name, a number or a callable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Initializer = str | float | Callable[[tuple[int, ...], torch.dtype], object]
Regularizer = str | Callable[[Tensor], Tensor] | None
Constraint = str | Callable[[Tensor], Tensor] | None

# Keras's defaults for the string forms: L1(0.01), L2(0.01), L1L2(l1=0.01, l2=0.01).
_REGULARIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": lambda w: 0.01 * w.abs().sum(),
    "l2": lambda w: 0.01 * w.square().sum(),
    "l1_l2": lambda w: 0.01 * w.abs().sum() + 0.01 * w.square().sum(),
}
_CONSTRAINTS: dict[str, Callable[[Tensor], Tensor]] = {
    "non_neg": lambda w: w * (w >= 0).to(w.dtype),
}


def initial_value(name: str, initializer: Initializer, shape: tuple[int, ...],
                  dtype: torch.dtype, device: torch.device) -> Tensor:
    """Call ``initializer(shape, dtype)`` (Keras's signature) or expand a name/number."""
    if isinstance(initializer, str):
        constants = {"zeros": 0.0, "ones": 1.0}
        if initializer not in constants:
            raise ValueError(f"{name} must be 'zeros', 'ones', a number or a callable "
                             f"(shape, dtype) -> array, got {initializer!r}")
        return torch.full(shape, constants[initializer], dtype=dtype, device=device)
    if isinstance(initializer, (int, float)):
        return torch.full(shape, float(initializer), dtype=dtype, device=device)
    if not callable(initializer):
        raise TypeError(f"{name} must be 'zeros', 'ones', a number or a callable "
                        f"(shape, dtype) -> array, got {type(initializer).__name__}")
    value = torch.as_tensor(initializer(shape, dtype), dtype=dtype, device=device)
    if value.numel() != shape[0]:
        raise ValueError(f"{name} returned {value.numel()} values, expected {shape[0]} "
                         f"(shape {list(shape)})")
    return value.reshape(shape).clone()


def resolve(name: str, option: Regularizer | Constraint,
            table: dict[str, Callable[[Tensor], Tensor]]
            ) -> Callable[[Tensor], Tensor] | None:
    if option is None or callable(option):
        return option
    if option not in table:
        raise ValueError(f"{name} must be None, a callable or one of {sorted(table)}, "
                         f"got {option!r}")
    return table[option]


def regularizer(name: str, option: Regularizer) -> Callable[[Tensor], Tensor] | None:
    """A penalty ``w -> scalar`` (Keras: ``regularizers.get``)."""
    return resolve(name, option, _REGULARIZERS)


def constraint(name: str, option: Constraint) -> Callable[[Tensor], Tensor] | None:
    """A projection ``w -> w'`` applied after each update (Keras: ``constraints.get``)."""
    return resolve(name, option, _CONSTRAINTS)
