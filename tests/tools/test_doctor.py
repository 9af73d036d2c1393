"""doctor: each finding is raised by a model built to have that bug, and a healthy trained
model gets none."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import Finding, doctor


def small_cnn(family=nn, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=bias), family.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8, bias=bias), family.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 2))


def data_batch(size: int = 64, generator: torch.Generator | None = None):
    """Two classes of 8x8 images: a bright square top-left or bottom-right."""
    labels = torch.randint(0, 2, (size,), generator=generator)
    images = torch.randn(size, 1, 8, 8, generator=generator) * 0.5
    for index, label in enumerate(labels):
        corner = slice(0, 4) if label == 0 else slice(4, 8)
        images[index, 0, corner, corner] += 2.0
    return images, labels


def train_healthy(family=nn) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Trained properly: BN parameters without weight decay, enough steps for the running
    statistics to forget their initial values, then eval()."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = small_cnn(family)
    bn_params = [p for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters()]
    other = [p for p in model.parameters() if all(p is not q for q in bn_params)]
    optimizer = torch.optim.SGD([{"params": other, "weight_decay": 1e-4},
                                 {"params": bn_params, "weight_decay": 0.0}], lr=0.05)
    model.train()
    for _ in range(80):
        images, labels = data_batch(generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval(), optimizer


@pytest.fixture(scope="module")
def healthy() -> tuple[nn.Module, torch.optim.Optimizer]:
    return train_healthy()


def codes(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(finding.code, finding.layer) for finding in findings}


@pytest.mark.parametrize("family", [nn, batchnorm], ids=["torch.nn", "batchnorm"])
def test_healthy_trained_model_has_no_findings(family):
    model, optimizer = train_healthy(family)
    batch = data_batch(generator=torch.Generator().manual_seed(7))
    assert doctor(model, batch, optimizer) == []
    model.train()
    assert doctor(model, batch, optimizer) == []


def test_doctor_with_a_batch_changes_neither_buffers_nor_modes(healthy):
    model, _ = healthy
    model[1].train()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    doctor(model, data_batch())
    assert [m.training for m in model.modules()] == [n == "1" for n, _ in model.named_modules()]
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    model.eval()


def test_reset_running_stats_of_a_trained_model_is_an_error():
    model, _ = train_healthy()
    model[6].reset_running_stats()
    findings = doctor(model)
    assert codes(findings) == {("stats-never-updated", "6")}
    assert findings[0].severity == "error"
    assert "recalibrate" in findings[0].fix


def test_untrained_model_stats_never_updated_is_a_warning():
    findings = doctor(small_cnn().eval())
    assert codes(findings) == {("stats-never-updated", "1"), ("stats-never-updated", "6")}
    assert {finding.severity for finding in findings} == {"warning"}


def test_batchnorm_left_in_train_mode_in_an_eval_model_is_an_error(healthy):
    model, _ = healthy
    model[6].train()
    try:
        findings = doctor(model)
    finally:
        model.eval()
    assert codes(findings) == {("bn-in-train-mode", "6")}
    assert findings[0].severity == "error"


def test_shifted_batch_shows_a_train_eval_gap(healthy):
    model, _ = healthy
    images, labels = data_batch()
    findings = doctor(model, (images * 3 + 2, labels))
    assert ("train-eval-gap", "1") in codes(findings)
    assert {finding.code for finding in findings} == {"train-eval-gap"}


def test_conv_and_linear_bias_before_batchnorm_are_redundant():
    model = small_cnn(batchnorm, bias=True)
    model(torch.randn(4, 1, 8, 8))  # statistics updated: only the bias is wrong
    findings = doctor(model.eval())
    assert codes(findings) == {("redundant-bias", "0"), ("redundant-bias", "5")}
    assert {finding.severity for finding in findings} == {"info"}


def test_redundant_bias_is_found_in_untraceable_models_through_sequential_neighbours():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))

        def forward(self, x):
            return self.features(x) if x.sum() > 0 else x

    model = Untraceable()
    model.features[1].num_batches_tracked += 1
    assert codes(doctor(model)) == {("redundant-bias", "features.0")}


def test_bias_before_a_frozen_batchnorm_is_not_redundant():
    model = batchnorm.freeze(small_cnn(bias=True).eval())
    assert doctor(model) == []


def test_tiny_batch_has_too_few_values_per_channel(healthy):
    model, _ = healthy
    images, labels = data_batch(size=4)
    findings = doctor(model, (images, labels))
    # BatchNorm2d sees 4 * 6 * 6 = 144 values per channel, BatchNorm1d only 4
    assert codes(findings) == {("few-values-per-channel", "6")}


def test_frozen_affine_params_with_updating_statistics(healthy):
    model, _ = healthy
    model.train()
    model[1].weight.requires_grad_(False)
    try:
        findings = doctor(model)
        model.eval()
        assert doctor(model) == []  # frozen and not updating: fine
    finally:
        model[1].weight.requires_grad_(True)
    assert codes(findings) == {("frozen-params-updating-stats", "1")}


def test_weight_decay_on_batchnorm_parameters(healthy):
    model, _ = healthy
    optimizer = torch.optim.AdamW(model.parameters())  # weight_decay=0.01 on everything
    findings = doctor(model, optimizer=optimizer)
    assert codes(findings) == {("weight-decay-on-bn", "1"), ("weight-decay-on-bn", "6")}
    assert "0.01" in findings[0].message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_running_buffers(healthy, dtype):
    model, _ = healthy
    half = copy.deepcopy(model).to(dtype)
    assert codes(doctor(half)) == {("half-running-stats", "1"), ("half-running-stats", "6")}


def test_bad_arguments_raise_clear_errors(healthy):
    model, _ = healthy
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got OrderedDict"):
        doctor(model.state_dict())
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        doctor(model, optimizer=[])
    with pytest.raises(RuntimeError, match="the model failed on the given batch"):
        doctor(model, torch.randn(2, 3, 8, 8))
    assert not model.training


def test_unbuilt_lazy_batchnorm_is_skipped_without_a_batch_and_checked_with_one():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), batchnorm.LazyBatchNorm1d()).eval()
    assert doctor(model) == []
    findings = doctor(model, torch.randn(8, 4))
    assert codes(findings) == {("few-values-per-channel", "1")}
