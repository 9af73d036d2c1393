"""The end-to-end architectures match their published definitions, and a converted copy
computes what the torch.nn model computes (the bench compares like with like)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.bench import models, training

_TORCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(type(module) is cls for module in model.modules())


def test_cifar_resnet18_has_the_published_size_and_20_batchnorms():
    model = models.resnet18_cifar()
    assert _parameters(model) == 11_173_962
    assert _count(model, nn.BatchNorm2d) == 20
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenet_v2_has_the_reference_parameter_count_and_52_batchnorms():
    # 3,504,872: the reference implementation's ImageNet model (1000 classes).
    assert _parameters(models.mobilenet_v2(num_classes=1000)) == 3_504_872
    model = models.mobilenet_v2()
    assert _count(model, nn.BatchNorm2d) == 52
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_the_tf_tutorial_mlp_is_six_hidden_bn_leaky_relu_layers_of_100():
    model = models.tf_tutorial_mlp()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(784, 100)] + [(100, 100)] * 5 + [(100, 10)]
    assert _count(model, nn.BatchNorm1d) == 6
    assert {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}


def test_the_hands_on_ml_mlp_is_784_300_100_10_with_elu_and_three_batchnorms():
    model = models.hands_on_ml_mlp()
    assert [(m.in_features, m.out_features) for m in model.modules()
            if isinstance(m, nn.Linear)] == [(784, 300), (300, 100), (100, 10)]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == \
        [784, 300, 100]
    assert _count(model, nn.ELU) == 2


def test_the_groupnorm_layernorm_cnn_has_no_batch_statistics():
    model = models.gn_ln_net()
    assert (_count(model, nn.GroupNorm), _count(model, nn.LayerNorm)) == (4, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    one, two = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():  # each sample's output is independent of the rest of the batch
        torch.testing.assert_close(model(torch.cat([one, two]))[:1], model(one))


@pytest.mark.parametrize("case", training.TINY_MODELS, ids=lambda case: case.name)
def test_a_converted_copy_computes_the_torch_models_loss_and_trains(case):
    torch.manual_seed(0)
    reference = case.build().train()
    converted = batchnorm.convert(copy.deepcopy(reference))
    assert not any(type(m) in _TORCH_NORMS for m in converted.modules())
    x = torch.randn(case.input_shape)
    target = torch.randint(case.num_classes, (case.input_shape[0],))
    losses = []
    for model in (reference, converted):
        torch.manual_seed(1)  # same dropout masks
        losses.append(nn.functional.cross_entropy(model(x), target).item())
    # Tiny batches through many BN layers are ill-conditioned: float32 results of any two
    # implementations drift apart by ~1e-4 relative (both as far from float64).
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    before = [p.detach().clone() for p in converted.parameters()]
    training.training_step(converted, x, target)()
    after = list(converted.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(old, new) for old, new in zip(before, after, strict=True))


def test_variants_run_their_copies_in_turn():
    calls = []
    step = training._in_turn([lambda copy=copy: calls.append(copy) for copy in range(3)])
    for _ in range(7):
        step()
    assert calls == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("convert", [False, True], ids=["torch.nn", "ours"])
def test_norm_time_counts_the_normalization_operators_and_nothing_else(convert):
    torch.manual_seed(0)
    x, target = torch.randn(16, 6), torch.randint(3, (16,))
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    if convert:
        batchnorm.convert(model)
    norm_ms, step_ms = training.norm_time(training.training_step(model, x, target))
    assert 0 < norm_ms < step_ms
    no_norm = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    assert training.norm_time(training.training_step(no_norm, x, target))[0] == 0
