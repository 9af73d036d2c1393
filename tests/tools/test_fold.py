"""fold: eval outputs of the folded model equal the original's (float32 to 1e-5, float64
to 1e-12) on several architectures, and the BatchNorms are really gone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.bench.fold import ResidualBlock
from batchnorm.tools import fold

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-12}


def trained_stats(model: nn.Module, input_shape: tuple[int, ...], *, steps: int = 3,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """Gives every BatchNorm non-trivial running statistics and affine parameters, so that
    a wrong fold (scale on the wrong channel, missing shift) shows in the output."""
    torch.manual_seed(0)
    model = model.to(dtype).train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(input_shape, dtype=dtype) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
    return model.eval()


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def assert_folds_exactly(model: nn.Module, input: torch.Tensor, tolerance: dict) -> nn.Module:
    folded = fold(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(input), model(input), **tolerance)
    return folded


def resnet(norm: type[nn.Module], norm1d: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        ResidualBlock(8, 8, 1, norm), ResidualBlock(8, 16, 2, norm, shortcut_bias=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), norm1d(12), nn.ReLU(),
        nn.Linear(12, 10))


@pytest.mark.parametrize("family", ["torch.nn", "batchnorm"])
def test_resnet_with_residual_branches_folds_every_batchnorm_and_keeps_outputs(family):
    module = nn if family == "torch.nn" else batchnorm
    model = trained_stats(resnet(module.BatchNorm2d, module.BatchNorm1d), (16, 3, 12, 12))
    folded = assert_folds_exactly(model, torch.randn(5, 3, 12, 12), F32)
    assert isinstance(folded, torch.fx.GraphModule)
    assert count(folded, _BatchNorm) == 0
    assert count(folded, nn.Module) < count(model, nn.Module)


def test_resnet_fold_is_exact_in_float64():
    model = trained_stats(resnet(batchnorm.BatchNorm2d, nn.BatchNorm1d), (16, 3, 12, 12),
                          dtype=torch.float64)
    assert_folds_exactly(model, torch.randn(5, 3, 12, 12, dtype=torch.float64), F64)


@pytest.mark.parametrize(("conv", "norm", "shape"), [
    (nn.Conv1d, nn.BatchNorm1d, (6, 4, 9)),
    (nn.Conv2d, nn.BatchNorm2d, (6, 4, 7, 7)),
    (nn.Conv3d, nn.BatchNorm3d, (6, 4, 5, 5, 5)),
])
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_conv_with_and_without_bias_folds_exactly(conv, norm, shape, groups):
    model = nn.Sequential(conv(4, 6, 3, groups=groups), norm(6), nn.ReLU(),
                          conv(6, 6, 3, groups=groups, bias=False), norm(6))
    model = trained_stats(model, shape, dtype=torch.float64)
    folded = assert_folds_exactly(model, torch.randn(shape, dtype=torch.float64), F64)
    assert count(folded, _BatchNorm) == 0


@pytest.mark.parametrize(("conv", "norm", "shape"), [
    (nn.ConvTranspose1d, nn.BatchNorm1d, (6, 4, 5)),
    (nn.ConvTranspose2d, nn.BatchNorm2d, (6, 4, 5, 5)),
    (nn.ConvTranspose3d, batchnorm.BatchNorm3d, (6, 4, 3, 3, 3)),
])
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_conv_transpose_folds_with_its_in_out_weight_layout(conv, norm, shape, groups):
    # in != out and groups > 1: weight (in, out/groups, ...) scaled per output channel
    model = nn.Sequential(conv(4, 6, 3, stride=2, groups=groups), norm(6))
    model = trained_stats(model, shape, dtype=torch.float64)
    folded = assert_folds_exactly(model, torch.randn(shape, dtype=torch.float64), F64)
    assert count(folded, _BatchNorm) == 0


def test_linear_then_batchnorm1d_and_channels_last_batchnorm_fold():
    model = nn.Sequential(nn.Linear(5, 7), batchnorm.BatchNorm1d(7), nn.Tanh(),
                          nn.Linear(7, 3, bias=False), nn.BatchNorm1d(3))
    model = trained_stats(model, (32, 5))
    folded = assert_folds_exactly(model, torch.randn(9, 5), F32)
    assert count(folded, _BatchNorm) == 0
    # generic BatchNorm(axis=-1) after a Linear on (N, L, F): features are the last dim
    model = trained_stats(nn.Sequential(nn.Linear(5, 7), batchnorm.BatchNorm(7, axis=-1)),
                          (8, 4, 5))
    folded = assert_folds_exactly(model, torch.randn(3, 4, 5), F32)
    assert count(folded, _BatchNorm) == 0


def test_batchnorm_without_affine_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    model = trained_stats(model, (8, 3, 6, 6), dtype=torch.float64)
    assert count(assert_folds_exactly(model, torch.randn(2, 3, 6, 6, dtype=torch.float64),
                                      F64), _BatchNorm) == 0


class SharedOutput(nn.Module):
    """The conv output feeds the BatchNorm and the skip connection: folding would change
    the skip, so the BatchNorm must become a FrozenBatchNorm instead."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(3)  # no preceding layer at all
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = batchnorm.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.input_norm(x))
        return self.bn(y) + y


def test_unfoldable_batchnorms_become_frozen_batchnorms_with_equal_outputs():
    model = trained_stats(SharedOutput(), (8, 3, 6, 6))
    folded = assert_folds_exactly(model, torch.randn(2, 3, 6, 6), F32)
    assert count(folded, _BatchNorm) == 0
    assert torch.equal(folded.conv.weight, model.conv.weight)  # not folded into
    assert isinstance(folded.bn, batchnorm.FrozenBatchNorm2d)
    assert isinstance(folded.input_norm, batchnorm.FrozenBatchNorm2d)


def test_conv_called_twice_is_not_folded_into():
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(self.conv(x)))

    model = trained_stats(Reused(), (8, 3, 6, 6))
    folded = assert_folds_exactly(model, torch.randn(2, 3, 6, 6), F32)
    assert torch.equal(folded.conv.weight, model.conv.weight)


def test_batchnorm_without_running_stats_is_left_in_place_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    model = trained_stats(model, (8, 3, 6, 6))
    with pytest.warns(UserWarning, match=r"'1' has no running statistics"):
        folded = assert_folds_exactly(model, torch.randn(4, 3, 6, 6), F32)
    assert count(folded, _BatchNorm) == 1


def test_untraceable_model_gets_frozen_batchnorms_with_a_warning():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    model = trained_stats(DataDependent(), (8, 3, 6, 6))
    with pytest.warns(UserWarning, match="could not trace"):
        folded = assert_folds_exactly(model, torch.randn(2, 3, 6, 6), F32)
    assert count(folded, _BatchNorm) == 0


def test_fold_leaves_the_original_model_untouched():
    model = trained_stats(resnet(nn.BatchNorm2d, nn.BatchNorm1d), (8, 3, 12, 12))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fold(model)
    assert not model.training
    assert count(model, _BatchNorm) == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_fold_rejects_a_non_module_and_a_lone_batchnorm():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        fold("model.pt")
    with pytest.raises(ValueError, match="single BatchNorm layer"):
        fold(nn.BatchNorm2d(3))


def test_fold_benchmark_reports_equal_outputs_and_the_three_timings():
    from batchnorm.bench.fold import measure

    result = measure(quick=True)
    assert result["max_abs_diff"] < 1e-5
    assert "9 BatchNorm2d" in result["model"]
    for key in ("torch_bn_ms", "ours_bn_ms", "folded_ms"):
        assert result[key] > 0
    assert result["speedup_vs_torch_bn"] == result["torch_bn_ms"] / result["folded_ms"]


@pytest.mark.parametrize("options", [
    {"activation": "relu"}, {"activation": "leaky_relu", "activation_param": 0.2},
    {"activation": "elu", "activation_param": 0.5}, {"activation": "silu"}, {"activation": "relu6"},
    {"ghost_batch_size": 4}, {"renorm": True},
], ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()))
def test_variant_batchnorms_fold_and_keep_their_fused_activation(options):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, **options),
                          nn.Conv2d(4, 2, 1))
    model = trained_stats(model, (8, 3, 6, 6), dtype=torch.float64)
    folded = assert_folds_exactly(model, torch.randn(3, 3, 6, 6, dtype=torch.float64), F64)
    assert count(folded, _BatchNorm) == 0


def test_frozen_batchnorm_after_a_conv_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                          batchnorm.BatchNorm2d(4, activation="relu"))
    model = batchnorm.freeze(trained_stats(model, (8, 3, 8, 8), dtype=torch.float64))
    folded = assert_folds_exactly(model, torch.randn(3, 3, 8, 8, dtype=torch.float64), F64)
    assert count(folded, batchnorm.FrozenBatchNorm) == 0
    assert count(folded, nn.ReLU) == 1


def test_fold_asks_for_a_forward_pass_before_folding_a_lazy_model():
    model = nn.Sequential(nn.LazyConv2d(4, 3), batchnorm.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"'0.weight' is uninitialized .lazy module.; run one"):
        fold(model)
    model(torch.randn(2, 3, 5, 5))
    assert_folds_exactly(model.eval(), torch.randn(2, 3, 5, 5), F32)


def test_norm_act_subclass_folds_and_keeps_its_activation_after_the_conv():
    from lookalikes import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU),
                          nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=nn.LeakyReLU,
                                                             act_kwargs={"negative_slope": 0.2}))
    model = trained_stats(model, (8, 3, 6, 6), dtype=torch.float64)
    folded = assert_folds_exactly(model, torch.randn(3, 3, 6, 6, dtype=torch.float64), F64)
    assert count(folded, _BatchNorm) == 0
    assert count(folded, nn.SiLU) == 1 and count(folded, nn.LeakyReLU) == 1


def test_batchnorm_subclasses_with_an_unknown_forward_are_left_and_reported():
    from lookalikes import BatchNormAct2d

    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBatchNorm(4), nn.Conv2d(4, 4, 1),
                          BatchNormAct2d(4, act_layer=nn.GELU), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    model = trained_stats(model, (8, 3, 6, 6), dtype=torch.float64)
    with pytest.warns(UserWarning, match="fold: left 2 BatchNorm") as caught:
        folded = assert_folds_exactly(model, torch.randn(3, 3, 6, 6, dtype=torch.float64), F64)
    message = str(caught[0].message)
    assert "'1' (ScaledBatchNorm)" in message and "'3' (BatchNormAct2d)" in message
    assert "GELU" in message
    assert count(folded, ScaledBatchNorm) == 1 and count(folded, BatchNormAct2d) == 1
    assert count(folded, nn.BatchNorm2d) == 2  # the plain one folded
    assert torch.equal(folded.get_submodule("0").weight, model[0].weight)  # not folded into


def test_synchronized_batchnorms_fold_like_plain_ones():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.SyncBatchNorm(4, activation="relu"),
                          nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4))
    model = trained_stats(model, (8, 3, 6, 6), dtype=torch.float64)
    folded = assert_folds_exactly(model, torch.randn(3, 3, 6, 6, dtype=torch.float64), F64)
    assert count(folded, _BatchNorm) == 0 and count(folded, nn.ReLU) == 1
