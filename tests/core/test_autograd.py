"""The analytic backward against finite differences in float64 (gradcheck), including
the second derivative (gradgradcheck), for every reduction the core performs."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from batchnorm import functional as F


def _inputs(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
            for s in shapes]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


CASES = {
    "batch_norm training": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                            (4, 3, 2, 3)),
    "batch_norm training (N,C)": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                                  (5, 3)),
    "batch_norm channels_last": (lambda x, w, b: F.batch_norm(_channels_last(x), None, None,
                                                              w, b, True), (3, 3, 2, 2)),
    "batch_norm axis=-1": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True, axis=-1),
                           (4, 2, 3)),
    "batch_norm eval": (lambda x, w, b: F.batch_norm(
        x, torch.linspace(-1, 1, 3, dtype=torch.float64),
        torch.linspace(0.5, 2, 3, dtype=torch.float64), w, b, False), (4, 3, 2)),
    "batch_norm + silu": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True,
                                                       activation="silu"), (4, 3, 2)),
    "batch_norm + elu": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True,
                                                      activation="elu",
                                                      activation_param=0.7), (4, 3, 2)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (2, 3, 5)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b), (2, 3, 2, 2)),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (3,), w, b), (4, 3)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradcheck_and_gradgradcheck_in_float64(case):
    function, shape = case
    x, w, b = _inputs(shape, (3,), (3,))
    assert gradcheck(function, (x, w, b))
    assert gradgradcheck(function, (x, w, b))


def test_gradcheck_without_affine_parameters():
    (x,) = _inputs((4, 3, 2))
    assert gradcheck(lambda t: F.batch_norm(t, None, None, None, None, True), (x,))
    assert gradgradcheck(lambda t: F.batch_norm(t, None, None, None, None, True), (x,))


def test_backward_is_the_operators_analytic_formula_not_composite_autograd():
    """One node, the operator's: the C++ autograd node on CPU when the compiled kernels are
    loaded, else the formula registered in Python (an autograd.Function of the same name)."""
    x, w, b = _inputs((4, 3, 2), (3,), (3,))
    y = F.batch_norm(x, None, None, w, b, True)
    assert y.grad_fn.name() == "BatchNormBackward"
    assert {type(f).__name__ for f, _ in y.grad_fn.next_functions} == {"AccumulateGrad"}
