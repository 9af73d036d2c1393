"""convert/revert swap layers in place, sharing tensors and keeping train/eval mode;
the generic BatchNorm(axis) normalizes any axis without a transpose."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)),
        nn.Flatten(), nn.LazyBatchNorm1d(), nn.LayerNorm(4 * 6 * 6),
    )


def test_convert_swaps_every_norm_layer_sharing_parameters_and_buffers():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(5, 3, 8, 8)
    model(x)  # initializes the lazy layer
    model.eval()
    tensors = {name: t.data_ptr() for name, t in model.state_dict().items()}
    expected = model(x)
    batchnorm.convert(model)
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)}
    assert kinds == {"batchnorm"}
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == tensors
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)  # float32 sums


def test_revert_restores_torch_classes_and_training_updates_shared_buffers():
    model = _model()
    model(torch.randn(5, 3, 8, 8))
    original = model[1].running_mean
    batchnorm.convert(model)
    model(torch.randn(5, 3, 8, 8))
    assert model[1].running_mean is original
    assert model[1].num_batches_tracked.item() == 2
    batchnorm.revert(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d
    assert model[1].running_mean is original and model.training


def test_convert_of_an_uninitialized_lazy_layer_initializes_the_new_layer():
    layer = batchnorm.convert(nn.LazyBatchNorm2d(momentum=0.3))
    assert type(layer) is batchnorm.LazyBatchNorm2d
    layer(torch.randn(2, 5, 3, 3))
    assert type(layer) is batchnorm.BatchNorm2d and layer.num_features == 5
    assert layer.momentum == 0.3


def test_optimizer_built_before_convert_still_trains_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert(model)
    before = model[1].weight.detach().clone()
    model(torch.randn(5, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)


@pytest.mark.parametrize("shape", [(6, 5, 4), (3, 2, 4, 5), (2, 3, 2, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_on_last_axis_equals_permuted_torch_batch_norm(shape, dtype):
    """axis=-1 (TF layout) against torch's BatchNorm on the moved axis over three steps."""
    channels = shape[-1]
    ours = batchnorm.BatchNorm(channels, axis=-1, dtype=dtype)
    reference = nn.BatchNorm1d(channels, dtype=dtype)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]  # summation order only
    for training in (True, True, True, False):
        ours.train(training)
        reference.train(training)
        x = torch.randn(shape, dtype=dtype) * 2 + 3
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(a)
        y_ref = reference(b.reshape(-1, channels)).reshape(shape)
        torch.testing.assert_close(y, y_ref, rtol=tolerance, atol=tolerance)
        grad = torch.randn(shape, dtype=dtype)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, rtol=tolerance, atol=tolerance)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=tolerance,
                                       atol=tolerance)


def test_batch_norm_on_a_middle_axis_matches_moving_that_axis_to_dim_1():
    x = torch.randn(4, 5, 3, 6, dtype=torch.float64)
    ours = batchnorm.BatchNorm(3, axis=2, dtype=torch.float64)
    reference = nn.BatchNorm2d(3, dtype=torch.float64)
    expected = reference(x.movedim(2, 1)).movedim(1, 2)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-12, atol=0)


# -- fused activations on revert -------------------------------------------------------------
ACTIVATIONS = [({"activation": "relu"}, nn.ReLU), ({"activation": "relu6"}, nn.ReLU6),
               ({"activation": "silu"}, nn.SiLU),
               ({"activation": "leaky_relu", "activation_param": 0.2}, nn.LeakyReLU),
               ({"activation": "elu", "activation_param": 0.5}, nn.ELU)]


def _with_statistics(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial running statistics and affine, so a dropped activation or a wrong
    parameter shows in the eval output."""
    torch.manual_seed(0)
    layer.train()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(shape, dtype=torch.float64) * 2 + 0.5)
        for module in layer.modules():
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
    return layer


@pytest.mark.parametrize(("options", "torch_activation"), ACTIVATIONS,
                         ids=[options["activation"] for options, _ in ACTIVATIONS])
def test_revert_keeps_a_fused_activation_as_a_module_after_the_torch_layer(
        options, torch_activation):
    layer = _with_statistics(batchnorm.BatchNorm2d(4, dtype=torch.float64, **options),
                             (8, 4, 3, 3))
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    expected = {training: copy.deepcopy(layer).train(training)(x) for training in (False, True)}
    weight = layer.weight
    reverted = batchnorm.revert(layer.eval())
    assert isinstance(reverted, nn.Sequential) and type(reverted[0]) is nn.BatchNorm2d
    assert type(reverted[1]) is torch_activation
    if "activation_param" in options:
        assert options["activation_param"] in (getattr(reverted[1], "negative_slope", None),
                                               getattr(reverted[1], "alpha", None))
    assert reverted[0].weight is weight and not reverted.training
    # converting the reverted model back must not apply the activation twice
    reconverted = batchnorm.convert(copy.deepcopy(reverted))
    for model in (reverted, reconverted):
        for training in (False, True):
            torch.testing.assert_close(copy.deepcopy(model).train(training)(x),
                                       expected[training], rtol=1e-12, atol=1e-12)


def test_reverted_model_keeps_its_activation_through_torch_conv_bn_fusion():
    """torch's fusion (fuse_conv_bn_eval, fx's fuse) only knows torch's BatchNorm: after
    revert the activation is a module of its own, which the fusion leaves in place."""
    from torch.fx.experimental.optimization import fuse

    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"),
                          nn.Conv2d(4, 2, 1)).double()
    model = _with_statistics(model, (8, 3, 6, 6)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    fused = fuse(batchnorm.revert(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, rtol=1e-10, atol=1e-10)


def test_reverted_model_fuses_in_torch_ao_eager_quantization():
    """torch.ao's fuse_modules looks its fuser methods up by exact type, so it refuses our
    subclasses; the reverted model fuses conv, BN and ReLU as torch.nn's does."""
    from torch.ao.quantization import fuse_modules

    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU()).double()
    model = _with_statistics(model, (8, 3, 6, 6)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse_modules(model, [["0", "1", "2"]])
    fused = fuse_modules(batchnorm.revert(model), [["0", "1", "2"]])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


# -- fuse_activations ------------------------------------------------------------------------
def _fusable_model() -> nn.Module:
    """BatchNorm -> activation pairs of each fusable kind (one nested), a BatchNorm followed
    by a Linear and a GroupNorm -> ReLU pair, neither of which fuses."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ELU(0.5),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU6(inplace=True)),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8),
        nn.Unflatten(1, (8, 1)), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
        nn.BatchNorm1d(8), nn.SiLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():  # pre-activations past relu6's kinks and in elu's negative branch
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm1d):
                layer.weight.uniform_(-4, 4)
                layer.bias.uniform_(-1, 1)
    return model


def test_convert_fuses_batchnorm_activation_pairs_of_sequentials_exactly():
    reference = _fusable_model()
    ours = batchnorm.convert(copy.deepcopy(reference), fuse_activations=True)
    fused = {name: (m.activation, m.activation_param) for name, m in ours.named_modules()
             if getattr(m, "activation", None)}
    assert fused == {"1": ("leaky_relu", 0.2), "4": ("elu", 0.5), "6.1": ("relu6", None),
                     "14": ("silu", None)}
    assert [name for name, m in ours.named_modules() if type(m) is nn.Identity] == \
        ["2", "5", "6.2", "15"]
    assert type(ours[12]) is nn.ReLU  # after a GroupNorm: not fused
    assert list(ours.state_dict()) == list(reference.state_dict())
    for step in range(3):  # outputs, gradients and running statistics over several steps
        x = torch.randn(16, 6, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(step)) * 2 + 3
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_ref = ours(a), reference(b)
        torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-10)
        y_ours.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), reference.named_parameters(),
                                          strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=0, msg=key)
    x = torch.randn(4, 6, dtype=torch.float64) * 2 + 3
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-10, atol=1e-10)


def test_convert_fuses_nothing_by_default_nor_pairs_with_hooks():
    assert not any(type(m) is nn.Identity for m in batchnorm.convert(_fusable_model()).modules())
    model = _fusable_model()
    model[2].register_forward_hook(lambda *args: None)  # on the activation
    model[4].register_forward_hook(lambda *args: None)  # on the BatchNorm
    model[6][1].register_full_backward_hook(lambda *args: None)
    batchnorm.convert(model, fuse_activations=True)
    assert [type(m) for m in (model[2], model[5], model[6][2], model[15])] == \
        [nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Identity]


def test_revert_puts_fused_activations_back_in_their_sequential():
    reference = _fusable_model()
    model = batchnorm.convert(copy.deepcopy(reference), fuse_activations=True)
    model[15] = nn.Tanh()  # an Identity replaced after fusing: that layer keeps its SiLU
    reverted = batchnorm.revert(model)
    assert [type(m) for m in (reverted[1], reverted[2], reverted[4], reverted[5],
                              reverted[6][1], reverted[6][2])] == \
        [nn.BatchNorm1d, nn.LeakyReLU, nn.BatchNorm1d, nn.ELU, nn.BatchNorm1d, nn.ReLU6]
    assert reverted[2].negative_slope == 0.2 and reverted[6][2].inplace
    assert isinstance(reverted[14], nn.Sequential) and type(reverted[14][1]) is nn.SiLU
    assert not any(hasattr(m, "activation") for m in reverted.modules())


# -- norm subclasses from the ecosystem ------------------------------------------------------
def _assert_same_layer_behaviour(original: nn.Module, converted: nn.Module,
                                 shape: tuple[int, ...]) -> None:
    """Training outputs, input gradients and updated buffers, then eval outputs, on copies."""
    original, converted = copy.deepcopy(original), copy.deepcopy(converted)
    for training in (True, False):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_original, y_converted = original.train(training)(a), converted.train(training)(b)
        torch.testing.assert_close(y_converted, y_original, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y_original)
        y_original.backward(grad)
        y_converted.backward(grad)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10)
        for key, value in original.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-12, atol=0)


NORM_ACT = [({}, {"activation": "relu"}),
            ({"act_layer": nn.SiLU}, {"activation": "silu"}),
            ({"act_layer": nn.ReLU6}, {"activation": "relu6"}),
            ({"act_layer": nn.LeakyReLU, "act_kwargs": {"negative_slope": 0.2}},
             {"activation": "leaky_relu", "activation_param": 0.2}),
            ({"act_layer": nn.ELU, "act_kwargs": {"alpha": 0.5}},
             {"activation": "elu", "activation_param": 0.5}),
            ({"apply_act": False}, {"activation": None}),
            ({"act_layer": nn.ReLU, "act_kwargs": {"inplace": True}}, {"activation": "relu"})]


@pytest.mark.parametrize(("kwargs", "fused"), NORM_ACT,
                         ids=["relu", "silu", "relu6", "leaky_relu", "elu", "no-act",
                              "inplace-relu"])
def test_convert_maps_a_norm_act_layer_to_our_fused_activation(kwargs, fused):
    from lookalikes import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, **kwargs)).double()
    model = _with_statistics(model, (8, 3, 3, 3))
    original = model[1]
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left over, so nothing is reported
        batchnorm.convert(model)
    layer = model[1]
    assert type(layer) is batchnorm.BatchNorm2d
    assert {name: getattr(layer, name) for name in fused} == fused
    assert layer.weight is original.weight and layer.running_var is original.running_var
    assert dict(layer.named_children()) == {}  # act/drop are now the fused activation
    assert layer.state_dict().keys() == original.state_dict().keys()
    _assert_same_layer_behaviour(reference, model, (6, 3, 3, 3))


def test_convert_maps_channels_first_layer_norm_to_our_layer_norm_2d():
    from lookalikes import LayerNorm2d

    model = nn.Sequential(nn.Conv2d(3, 6, 1), LayerNorm2d(6), nn.GELU(),
                          LayerNorm2d(6, affine=False)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.normal_()
    reference = copy.deepcopy(model)
    weight = model[1].weight
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.LayerNorm2d and type(model[3]) is batchnorm.LayerNorm2d
    assert model[1].weight is weight and model[1].eps == 1e-6 and model[3].weight is None
    _assert_same_layer_behaviour(reference, model, (2, 3, 4, 5))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)


def test_convert_then_revert_restores_the_ecosystem_classes_and_their_modules():
    from lookalikes import BatchNormAct2d, LayerNorm2d

    model = nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU), LayerNorm2d(4))
    act = model[0].act
    batchnorm.revert(batchnorm.convert(model))
    assert type(model[0]) is BatchNormAct2d and model[0].act is act
    assert type(model[1]) is LayerNorm2d
    assert not hasattr(model[0], "activation") or model[0].activation is None


def _left_over(model: nn.Module) -> str:
    with pytest.warns(UserWarning, match="convert: left") as caught:
        batchnorm.convert(model)
    return "\n".join(str(warning.message) for warning in caught)


def test_norm_act_layer_without_a_fused_equivalent_is_left_and_reported():
    from lookalikes import BatchNormAct2d

    model = nn.Sequential(BatchNormAct2d(4, act_layer=nn.GELU),
                          BatchNormAct2d(4, drop_layer=lambda: nn.Dropout(0.1)),
                          nn.BatchNorm2d(4))
    message = _left_over(model)
    assert type(model[0]) is BatchNormAct2d and type(model[1]) is BatchNormAct2d
    assert type(model[2]) is batchnorm.BatchNorm2d
    assert "'0' (BatchNormAct2d)" in message and "GELU" in message
    assert "'1' (BatchNormAct2d)" in message and "Dropout" in message


def test_lookalikes_whose_forward_differs_on_a_probe_are_left_and_reported():
    class LayerNorm2d(nn.LayerNorm):  # the name, but channels-last: normalizes the last dim
        def forward(self, x):
            return super().forward(x)

    class BatchNormAct2d(nn.BatchNorm2d):  # the name and attributes, but act is never called
        def __init__(self, num_features: int) -> None:
            super().__init__(num_features)
            self.act, self.drop = nn.ReLU(), nn.Identity()

    model = nn.Sequential(LayerNorm2d(5), BatchNormAct2d(5))
    message = _left_over(model)
    assert type(model[0]) is LayerNorm2d and type(model[1]) is BatchNormAct2d
    assert "'0' (LayerNorm2d)" in message and "'1' (BatchNormAct2d)" in message
    assert message.count("probe") == 2


def test_unknown_norm_subclasses_are_left_and_reported():
    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Sequential(ScaledBatchNorm(3)), nn.SyncBatchNorm(3),
                          nn.GroupNorm(1, 3))
    message = _left_over(model)
    assert type(model[0][0]) is ScaledBatchNorm and type(model[1]) is nn.SyncBatchNorm
    assert type(model[2]) is batchnorm.GroupNorm
    assert "'0.0' (ScaledBatchNorm)" in message
    assert "'1' (SyncBatchNorm)" in message and "convert_sync_batchnorm" in message
