"""batchnorm.keras.BatchNormalization: the Keras API around the normalization (lazy build,
training flag, trainable, regularizers, constraints, weights) and its argument checks.
Numerics against TF live in test_keras_golden.py; here float64 references use rtol 1e-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm.keras import BatchNormalization


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _reference_normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


# -- building and the training flag ----------------------------------------------------------
def test_weights_are_created_on_first_call_with_the_inputs_dtype_and_shape_c():
    layer = BatchNormalization(renorm=True)
    assert not layer.built and layer.has_uninitialized_params()
    layer(_randn(4, 3, 5), training=True)
    assert layer.built
    for name in layer.weight_names:
        tensor = getattr(layer, name)
        assert tensor.shape == (5,) and tensor.dtype == torch.float64, name
    assert [p.shape for p in layer.parameters()] == [(5,), (5,)]


def test_build_creates_the_weights_before_any_call_for_the_optimizer():
    layer = BatchNormalization(axis=1)
    layer.build((2, 7, 4, 4))
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = _randn(2, 7, 4, 4, dtype=torch.float32)
    layer(x, training=True).square().sum().backward()
    before = layer.gamma.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.gamma.detach(), before)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"trainable": False}])
def test_optimizer_created_before_the_first_call_holds_and_trains_gamma_and_beta(kwargs):
    """torch's usual order: model, optimizer, then the first batch."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), BatchNormalization(**kwargs))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    layer = model[1]
    x = _randn(8, 3, dtype=torch.float32)
    (model(x) * _randn(8, 4, seed=1, dtype=torch.float32)).sum().backward()
    gamma, beta = layer.gamma.detach().clone(), layer.beta.detach().clone()
    optimizer.step()
    trained = not torch.equal(layer.gamma, gamma) and not torch.equal(layer.beta, beta)
    assert trained == layer.trainable
    assert {id(p) for p in layer.parameters()} <= \
        {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_half_precision_input_gets_float32_weights_and_half_output():
    layer = BatchNormalization()
    x = _randn(8, 3, dtype=torch.float32)
    y = layer(x.half(), training=True)
    assert y.dtype == torch.float16 and layer.gamma.dtype == torch.float32
    expected = _reference_normalize(x.half().double(), (0,), 1e-3)
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)


def test_training_none_follows_module_mode_and_explicit_flag_overrides_it():
    x = _randn(6, 4)
    layer = BatchNormalization(momentum=0.5)
    layer(x, training=False)
    inference = (x - 0.0) / torch.sqrt(torch.tensor(1.0 + 1e-3, dtype=torch.float64))
    torch.testing.assert_close(layer.eval()(x), inference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.train()(x), _reference_normalize(x, (0,), 1e-3),
                               rtol=1e-10, atol=1e-12)
    moving_mean = layer.moving_mean.clone()
    torch.testing.assert_close(layer.train()(x, training=False),
                               (x - moving_mean) / torch.sqrt(layer.moving_variance + 1e-3),
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(layer.moving_mean, moving_mean)


def test_trainable_false_forces_inference_and_freezes_gamma_beta():
    layer = BatchNormalization(trainable=False, moving_mean_initializer=0.5)
    x = _randn(6, 4)
    y = layer.train()(x, training=True)
    torch.testing.assert_close(y, (x - 0.5) / torch.sqrt(torch.tensor(1.001, dtype=x.dtype)),
                               rtol=1e-10, atol=1e-12)
    assert torch.equal(layer.moving_mean, torch.full((4,), 0.5, dtype=x.dtype))
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    layer.trainable = True
    assert layer.gamma.requires_grad
    layer(x, training=True)
    assert not torch.equal(layer.moving_mean, torch.full((4,), 0.5, dtype=x.dtype))


# -- layouts and ghost batches ---------------------------------------------------------------
def test_virtual_batches_group_samples_strided_like_tf():
    """Ghost batch j of a batch of 12 with virtual_batch_size 3 is samples j, j+4, j+8."""
    x = _randn(12, 5)
    y = BatchNormalization(virtual_batch_size=3)(x, training=True)
    for j in range(4):
        torch.testing.assert_close(y[j::4], _reference_normalize(x[j::4], (0,), 1e-3),
                                   rtol=1e-10, atol=1e-12)


def test_virtual_batch_moving_statistics_average_the_group_statistics():
    x = _randn(8, 3, 2, 5)
    layer = BatchNormalization(virtual_batch_size=2, momentum=0.0)
    layer(x, training=True)
    groups = x.view(2, 4, 3, 2, 5)
    means = groups.mean((0, 2, 3))
    variances = groups.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.moving_mean, means.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.moving_variance, variances.mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"axis": 1}, {"axis": 1, "virtual_batch_size": 2},
                                    {"axis": 1, "renorm": True}])
def test_channels_last_memory_gives_the_same_result_as_contiguous(kwargs):
    x = _randn(4, 3, 5, 6)
    dy = _randn(4, 3, 5, 6, seed=1)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        layer = BatchNormalization(**kwargs)
        xm = x.contiguous(memory_format=memory_format).detach().requires_grad_()
        y = layer(xm, training=True)
        (y * dy).sum().backward()
        results.append((y.detach(), xm.grad, layer.gamma.grad, layer.moving_variance))
    for first, second in zip(*results, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-10, atol=1e-12)


# -- Keras weight API --------------------------------------------------------------------------
def test_get_weights_returns_keras_order_and_set_weights_assigns_it():
    layer = BatchNormalization(renorm=True)
    layer.build((2, 3))
    assert layer.weight_names == ["gamma", "beta", "moving_mean", "moving_variance",
                                  "moving_stddev", "renorm_mean", "renorm_stddev"]
    new = [np.full(3, float(i), dtype=np.float32) for i in range(7)]
    layer.set_weights(new)
    for i, (name, value) in enumerate(zip(layer.weight_names, layer.get_weights(),
                                          strict=True)):
        assert np.array_equal(value, new[i]), name
        assert torch.equal(getattr(layer, name), torch.full((3,), float(i))), name


def test_set_weights_accepts_keras_virtual_batch_shapes_and_rejects_wrong_ones():
    layer = BatchNormalization(center=False)
    layer.build((4, 3))
    assert layer.weight_names == ["gamma", "moving_mean", "moving_variance"]
    layer.set_weights([np.ones((1, 1, 3)), np.zeros(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"expects 3 arrays \(gamma, moving_mean, "
                                         r"moving_variance\), got 2"):
        layer.set_weights([np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"moving_mean must have shape \[3\], got \[4\]"):
        layer.set_weights([np.ones(3), np.ones(4), np.ones(3)])


def test_weights_api_before_build_says_to_build():
    with pytest.raises(RuntimeError, match="get_weights\\(\\) needs the layer built"):
        BatchNormalization().get_weights()


def test_state_dict_round_trips_into_a_built_layer():
    source = BatchNormalization(renorm=True)
    source(_randn(6, 4), training=True)
    target = BatchNormalization(renorm=True)
    target.build((6, 4), dtype=torch.float64)
    target.load_state_dict(source.state_dict())
    for name in source.weight_names:
        assert torch.equal(getattr(source, name), getattr(target, name)), name


def test_state_dict_loads_into_an_unbuilt_layer_and_must_match_the_input_channels():
    # float32: torch's lazy load materializes in the default dtype, as LazyBatchNorm does
    source = BatchNormalization(renorm=True)
    source(_randn(6, 4, dtype=torch.float32), training=True)
    target = BatchNormalization(renorm=True)
    target.load_state_dict(source.state_dict())
    x = _randn(5, 4, seed=2, dtype=torch.float32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)
    other = BatchNormalization(renorm=True)
    other.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match=r"gamma was loaded with shape \[4\], but an input "
                                         r"of shape \[5, 3\] has 3 channels on axis -1"):
        other(_randn(5, 3, dtype=torch.float32))


def test_regularizers_add_their_penalty_to_losses_with_gradient():
    layer = BatchNormalization(gamma_regularizer="l2",
                               beta_regularizer=lambda w: 3.0 * w.abs().sum(),
                               gamma_initializer=2.0, beta_initializer=-1.0)
    assert layer.losses == []
    layer.build((2, 4))
    gamma_loss, beta_loss = layer.losses
    torch.testing.assert_close(gamma_loss, torch.tensor(0.01 * 4 * 4.0))
    torch.testing.assert_close(beta_loss, torch.tensor(3.0 * 4))
    sum(layer.losses).backward()
    torch.testing.assert_close(layer.gamma.grad, torch.full((4,), 0.01 * 2 * 2.0))


def test_constraints_apply_after_each_optimizer_step_not_in_forward():
    layer = BatchNormalization(gamma_constraint="non_neg",
                               beta_constraint=lambda w: w.clamp(max=0.1))
    layer.build((4, 2))
    optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
    layer.constrain_after(optimizer)
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0], [-2.0, 1.0]])
    (layer(x, training=True) * torch.tensor([1.0, -1.0])).sum().backward()
    optimizer.step()
    unconstrained_beta = -10.0 * layer.beta.grad
    assert (layer.gamma >= 0).all()
    torch.testing.assert_close(layer.beta.detach(), unconstrained_beta.clamp(max=0.1))
    with torch.no_grad():
        layer.gamma.fill_(-1.0)
    layer(x, training=True)
    assert (layer.gamma == -1.0).all()
    layer.apply_constraints()
    assert (layer.gamma == 0.0).all()


# -- renorm and adjustment algebra -----------------------------------------------------------
def test_renorm_first_step_from_default_state_is_plain_batch_norm_with_r_d_applied():
    """Initial renorm_mean 0, renorm_stddev 1: r = sigma_B, d = mu_B, so
    y = x_hat * r + d; the moving variance is relu(moving_stddev^2 - eps)."""
    x = _randn(16, 3) * 2 + 1
    layer = BatchNormalization(renorm=True, momentum=0.5, renorm_momentum=0.5)
    y = layer(x, training=True)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    sigma = torch.sqrt(var + 1e-3)
    torch.testing.assert_close(y, _reference_normalize(x, (0,), 1e-3) * sigma + mean,
                               rtol=1e-10, atol=1e-12)
    moving_stddev = 1.0 - (1.0 - sigma) * 0.5
    torch.testing.assert_close(layer.moving_stddev, moving_stddev, rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.moving_variance,
                               torch.relu(moving_stddev.square() - 1e-3), rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.renorm_mean, mean * 0.5, rtol=1e-10, atol=0)


def test_adjustment_is_applied_in_training_only():
    scale, bias = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -1.0],
                                                                              dtype=torch.float64)
    layer = BatchNormalization(adjustment=lambda shape: (scale, bias),
                               gamma_initializer=3.0, beta_initializer=0.25)
    x = _randn(5, 2)
    torch.testing.assert_close(layer(x, training=True),
                               (_reference_normalize(x, (0,), 1e-3) * scale + bias) * 3 + 0.25,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x, training=False),
                               (x - layer.moving_mean) / torch.sqrt(layer.moving_variance + 1e-3)
                               * 3 + 0.25, rtol=1e-10, atol=1e-12)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"momentum": 1.5}, r"momentum must be a number in \[0.0, 1.0\], got 1.5"),
    ({"renorm_momentum": -0.1}, r"renorm_momentum must be a number in \[0.0, 1.0\], got -0.1"),
    ({"epsilon": 0.0}, r"epsilon must be a number in \(0.0, inf\], got 0.0"),
    ({"axis": [1, 2]}, r"axis must be one int \(one channel axis\), got \[1, 2\]"),
    ({"virtual_batch_size": 0}, r"virtual_batch_size must be a positive int .*, got 0"),
    ({"virtual_batch_size": 2, "adjustment": lambda s: (1, 0)},
     r"adjustment cannot be given together with virtual_batch_size"),
    ({"renorm": True, "renorm_clipping": {"rmax": 3, "dmin": 1}},
     r"renorm_clipping keys must be among \('rmax', 'rmin', 'dmax'\), got \['dmin'\]"),
    ({"fused": True, "renorm": True}, r"fused=True cannot be used with renorm"),
    ({"fused": True, "axis": 2},
     r"fused=True cannot be used with axis: .* axis 1 or 3 \(4D\).*, got axis=2"),
    ({"gamma_regularizer": "l3"}, r"gamma_regularizer must be None, a callable or one of "
                                  r"\['l1', 'l1_l2', 'l2'\], got 'l3'"),
    ({"beta_constraint": "max_norm"}, r"beta_constraint must be None, a callable or one of "
                                      r"\['non_neg'\], got 'max_norm'"),
])
def test_bad_constructor_arguments_name_argument_expected_and_actual(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize(("kwargs", "shape", "message"), [
    ({"axis": 3}, (4, 5), r"axis must be in \[-2, 1\] for a 2D input, got 3"),
    ({"fused": True}, (4, 5, 6), r"fused=True needs a 4D or 5D .* got 3D"),
    ({"virtual_batch_size": 2, "axis": 0}, (4, 5), r"axis cannot be 0 .* got axis=0"),
    ({"gamma_initializer": "glorot_uniform"}, (4, 5),
     r"gamma_initializer must be 'zeros', 'ones', a number or a callable .* "
     r"got 'glorot_uniform'"),
    ({"beta_initializer": lambda shape, dtype: [1.0, 2.0]}, (4, 5),
     r"beta_initializer returned 2 values, expected 5"),
])
def test_bad_build_arguments_name_argument_expected_and_actual(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        BatchNormalization(**kwargs)(torch.ones(shape), training=True)


def test_virtual_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"virtual_batch_size must divide the batch size 10, "
                                         r"got 4"):
        BatchNormalization(virtual_batch_size=4)(torch.randn(10, 3), training=True)


def test_input_with_other_channels_or_rank_than_built_is_rejected():
    layer = BatchNormalization()
    layer(torch.randn(4, 3), training=True)
    with pytest.raises(ValueError, match=r"input must be 2D with 3 channels on axis -1, "
                                         r"got shape \[4, 5\]"):
        layer(torch.randn(4, 5))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match=r"floating point input, got torch\.int64"):
        BatchNormalization()(torch.ones(4, 3, dtype=torch.int64))


def test_nan_input_raises_and_leaves_moving_statistics_unchanged():
    layer = BatchNormalization()
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="batch statistics are not finite"):
        layer(x, training=True)
    assert torch.equal(layer.moving_mean, torch.zeros(3))
    assert torch.equal(layer.moving_variance, torch.ones(3))


def test_fused_training_needs_two_values_per_channel():
    with pytest.raises(ValueError, match=r"more than 1 value per channel .* \[1, 3, 1, 1\]"):
        BatchNormalization(axis=1)(torch.randn(1, 3, 1, 1), training=True)


def test_build_twice_is_an_error_rather_than_new_weights():
    layer = BatchNormalization()
    layer.build((4, 3))
    with pytest.raises(RuntimeError, match="already built"):
        layer.build((4, 3))


def test_empty_batch_is_an_error_in_training_and_fine_in_inference():
    layer = BatchNormalization()
    layer.build((0, 3))
    assert layer(torch.zeros(0, 3), training=False).shape == (0, 3)
    with pytest.raises(ValueError, match=r"non-empty batch, got input shape \[0, 3\]"):
        layer(torch.zeros(0, 3), training=True)


def test_float64_4d_input_takes_the_unfused_path_like_a_float64_keras_layer():
    """TF cannot fuse float64, so the biased variance is stored."""
    x = _randn(4, 3, 2, 5)
    layer = BatchNormalization(momentum=0.0)
    layer(x, training=True)
    assert layer.fused is False
    torch.testing.assert_close(layer.moving_variance, x.var((0, 1, 2), unbiased=False),
                               rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"fused=True needs a 4D or 5D float16/bfloat16/"
                                         r"float32 input, got 4D torch\.float64"):
        BatchNormalization(fused=True)(x, training=True)


@pytest.mark.parametrize("kwargs", [
    {},
    {"axis": 1, "virtual_batch_size": 2},
    {"renorm": True, "virtual_batch_size": 3,
     "renorm_clipping": {"rmin": 1.5, "rmax": 1.5, "dmax": 0.0}},
    {"axis": 1, "adjustment": lambda shape: (torch.full((shape[1], 1), 1.5, dtype=torch.float64),
                                             torch.full((shape[1], 1), 0.2, dtype=torch.float64))},
])
def test_training_backward_passes_float64_gradcheck_for_input_gamma_beta(kwargs):
    """r and d carry no gradient (as in TF), so the renorm case clips them to constants
    (r = 1.5, d = 0) for the finite differences to agree."""
    layer = BatchNormalization(gamma_initializer=1.3, beta_initializer=0.1, **kwargs)
    x = (_randn(6, 3, 4) * 2 + 1).requires_grad_()
    layer.build(x.shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, g, b: torch.func.functional_call(
        layer, {"gamma": g, "beta": b}, (x,), {"training": True}),
        (x, layer.gamma, layer.beta), eps=1e-6, atol=1e-6)
