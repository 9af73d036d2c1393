"""Ghost batches on the torch-style layers, against a float64 reference that loops over
the chunks with torch.nn.functional.batch_norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import functional as F

TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: only rounding differs


def ghost_reference(x, weight, bias, ghost_batch_size, eps, axis=1):
    """Each chunk of samples normalized on its own; returns the output and the pooled
    running-statistics update: count-weighted mean and sum(n_g * var_g) / sum(n_g - 1)."""
    moved = x.movedim(axis, 1)
    outputs, means, m2s, counts = [], [], [], []
    for chunk in moved.split(ghost_batch_size):
        outputs.append(nn.functional.batch_norm(chunk, None, None, weight, bias, True,
                                                eps=eps))
        dims = [d for d in range(chunk.dim()) if d != 1]
        count = chunk.numel() // chunk.shape[1]
        means.append(chunk.detach().mean(dims) * count)
        m2s.append(chunk.detach().var(dims, unbiased=False) * count)
        counts.append(count)
    total = sum(counts)
    mean = sum(means) / total
    var = sum(m2s) / (total - len(counts))
    return torch.cat(outputs).movedim(1, axis), mean, var


CASES = [  # layer, input shape, ghost_batch_size, memory format / axis
    (batchnorm.BatchNorm1d, (12, 3), 4, None),
    (batchnorm.BatchNorm1d, (10, 3, 5), 4, None),  # chunks 4, 4, 2
    (batchnorm.BatchNorm2d, (9, 3, 4, 5), 3, None),
    (batchnorm.BatchNorm2d, (11, 3, 4, 5), 3, torch.channels_last),  # chunks 3, 3, 3, 2
    (batchnorm.BatchNorm3d, (6, 3, 2, 3, 4), 4, None),
    (batchnorm.BatchNorm3d, (6, 3, 2, 3, 4), 2, torch.channels_last_3d),
    (batchnorm.BatchNorm, (10, 5, 3), 4, -1),  # channels-last layout (N, L, C), axis=-1
]


def _layer(cls, axis, ghost_batch_size):
    options = {"axis": axis} if cls is batchnorm.BatchNorm else {}
    return cls(3, ghost_batch_size=ghost_batch_size, dtype=torch.float64, **options)


@pytest.mark.parametrize(("cls", "shape", "ghost_batch_size", "layout"), CASES)
def test_ghost_batches_match_chunk_loop_reference_over_steps_then_eval(
        cls, shape, ghost_batch_size, layout):
    generator = torch.Generator().manual_seed(0)
    axis = layout if isinstance(layout, int) else 1
    layer = _layer(cls, axis, ghost_batch_size)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.uniform_(-1, 1, generator=generator)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=generator) * (step + 1) + step
        if isinstance(layout, torch.memory_format):
            x = x.to(memory_format=layout)
        x.requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = layer(x)
        y_ref, mean, var = ghost_reference(x_ref, weight, bias, ghost_batch_size, layer.eps,
                                           axis)
        torch.testing.assert_close(y, y_ref, **TOL)
        dy = torch.randn(shape, dtype=torch.float64, generator=generator)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        torch.testing.assert_close(layer.weight.grad, weight.grad, **TOL)
        torch.testing.assert_close(layer.bias.grad, bias.grad, **TOL)
        for grad in (layer.weight.grad, layer.bias.grad, weight.grad, bias.grad):
            grad.zero_()
        running_mean = (1 - layer.momentum) * running_mean + layer.momentum * mean
        running_var = (1 - layer.momentum) * running_var + layer.momentum * var
        torch.testing.assert_close(layer.running_mean, running_mean, **TOL)
        torch.testing.assert_close(layer.running_var, running_var, **TOL)
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    expected = nn.functional.batch_norm(x.movedim(axis, 1), running_mean, running_var,
                                        weight, bias, False, eps=layer.eps).movedim(1, axis)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_ghost_batches_differ_from_whole_batch_normalization():
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    x[:4] += 5  # the two ghost batches have different means
    ghost = batchnorm.BatchNorm1d(2, ghost_batch_size=4, dtype=torch.float64)(x)
    whole = batchnorm.BatchNorm1d(2, dtype=torch.float64)(x)
    assert (ghost - whole).abs().max() > 1.0


def test_ghost_batch_size_not_smaller_than_the_batch_is_plain_batchnorm():
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    ghost = batchnorm.BatchNorm1d(3, ghost_batch_size=8, dtype=torch.float64)
    plain = nn.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), plain(x), **TOL)
    torch.testing.assert_close(ghost.running_var, plain.running_var, **TOL)


def test_ghost_batches_gradcheck_float64_with_uneven_last_chunk():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()
    bias = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()

    def fn(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, True, ghost_batch_size=3,
                            activation="silu")

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_ghost_last_chunk_of_one_sample_raises_naming_size_batch_and_chunk():
    layer = batchnorm.BatchNorm2d(3, ghost_batch_size=4)
    with pytest.raises(ValueError, match=r"ghost_batch_size=4 .* N=9 .* last one has 1 sample"):
        layer(torch.randn(9, 3, 2, 2))
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()


@pytest.mark.parametrize("size", [0, 1, -2, 2.5, True, "4"])
def test_ghost_batch_size_must_be_an_integer_of_at_least_two(size):
    with pytest.raises(ValueError, match=f"ghost_batch_size must be None or an integer >= 2, "
                                         f"got {size!r}"):
        batchnorm.BatchNorm1d(3, ghost_batch_size=size)


def test_ghost_batches_cannot_split_the_channel_axis():
    with pytest.raises(ValueError, match="cannot also be the channel axis; got axis=0"):
        batchnorm.BatchNorm(4, axis=0, ghost_batch_size=2)(torch.randn(4, 6))


def test_ghost_batch_size_is_ignored_in_eval_and_leaves_state_dict_unchanged():
    layer = batchnorm.BatchNorm2d(3, ghost_batch_size=2).eval()
    plain = nn.BatchNorm2d(3).eval()
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(layer(x), plain(x))
    assert list(layer.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    layer.load_state_dict(plain.state_dict())


class TwinRankReducer:
    """A second process holding the same batch: merged statistics keep mean and variance
    and double the count; gradient partial sums double."""

    def __init__(self):
        self.calls = 0

    def merge_moments(self, mean, var, count):
        self.calls += 1
        return mean, var, 2 * count

    def sum_(self, *tensors):
        self.calls += 1
        for tensor in tensors:
            tensor.mul_(2)


def test_ghost_batches_with_a_reducer_stay_per_process():
    x = torch.randn(8, 3, 2, dtype=torch.float64, requires_grad=True)
    reducer = TwinRankReducer()
    y = F.batch_norm(x, None, None, training=True, ghost_batch_size=4, reducer=reducer)
    y.square().sum().backward()
    local = x.detach().clone().requires_grad_()
    y_local = F.batch_norm(local, None, None, training=True, ghost_batch_size=4)
    y_local.square().sum().backward()
    assert reducer.calls == 0
    torch.testing.assert_close(y, y_local, **TOL)
    torch.testing.assert_close(x.grad, local.grad, **TOL)


def test_renorm_with_a_reducer_normalizes_with_the_global_batch():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=generator).requires_grad_()
    dy = torch.randn(6, 3, 4, dtype=torch.float64, generator=generator)
    running_mean = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    running_var = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    options = {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}
    stats = (running_mean.clone(), running_var.clone())
    y = F.batch_norm(x, *stats, training=True, reducer=TwinRankReducer(), **options)
    y.backward(dy)
    twins = [x.detach().clone().requires_grad_() for _ in range(2)]
    global_stats = (running_mean.clone(), running_var.clone())
    y_global = F.batch_norm(torch.cat(twins), *global_stats, training=True, **options)
    y_global.backward(torch.cat([dy, dy]))
    torch.testing.assert_close(y, y_global[:6], **TOL)
    torch.testing.assert_close(x.grad, twins[0].grad, **TOL)
    torch.testing.assert_close(stats[1], global_stats[1], **TOL)
