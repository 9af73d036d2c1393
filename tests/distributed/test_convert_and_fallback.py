"""In one process: convert/revert round trips, and the local fallback (no process group,
or a group of one) that must not communicate and must equal the plain layer exactly."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from harness import CollectiveCounter
from torch import nn

from batchnorm.modules.batchnorm import BatchNorm, BatchNorm1d
from batchnorm.modules.syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm


def _model() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 4, 3),
        bn=nn.BatchNorm2d(4),
        head=nn.Sequential(OrderedDict(flat=nn.Flatten(), ours=BatchNorm1d(36).eval())),
        tf=BatchNorm(36, axis=-1),
    ))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_convert_then_revert_shares_tensors_keeps_modes_and_restores_classes() -> None:
    model = _model()
    before_tensors, before_state = _tensors(model), model.state_dict()
    before_classes = {name: type(module) for name, module in model.named_modules()}
    before_modes = {name: module.training for name, module in model.named_modules()}
    group = object()  # stands in for a process group: only stored

    assert convert_sync_batchnorm(model, group) is model
    for name in ("bn", "head.ours", "tf"):
        layer = model.get_submodule(name)
        assert type(layer) is SyncBatchNorm, name
        assert layer.process_group is group
        assert layer.layer_name == f"SyncBatchNorm '{name}'"
    assert model.tf.axis == -1
    assert {name: module.training for name, module in model.named_modules()} == before_modes
    assert all(tensor is before_tensors[name] for name, tensor in _tensors(model).items())
    assert model.state_dict().keys() == before_state.keys()

    assert revert_sync_batchnorm(model) is model
    assert {name: type(module) for name, module in model.named_modules()} == before_classes
    assert {name: module.training for name, module in model.named_modules()} == before_modes
    assert all(tensor is before_tensors[name] for name, tensor in _tensors(model).items())
    assert not any(hasattr(module, "process_group") for module in model.modules())


def test_revert_of_directly_built_syncbn_gives_rank_agnostic_local_batchnorm() -> None:
    layer = SyncBatchNorm(3, momentum=None, affine=False).eval()
    local = revert_sync_batchnorm(layer)
    assert type(local) is BatchNorm and local.axis == 1 and not local.training
    assert local.running_mean is layer.running_mean and local.momentum is None
    x = torch.randn(4, 3, 2, 2, 2)
    torch.testing.assert_close(local(x), layer(x), rtol=0, atol=0)


def test_torch_syncbn_converts_and_reverts_to_itself_keeping_the_conversion_group() -> None:
    group = object()
    original = nn.SyncBatchNorm(5)
    converted = convert_sync_batchnorm(original, group)
    assert type(converted) is SyncBatchNorm and converted.weight is original.weight
    reverted = revert_sync_batchnorm(converted)
    assert type(reverted) is nn.SyncBatchNorm and reverted.process_group is group


def test_converting_an_uninitialized_lazy_layer_names_it() -> None:
    model = nn.Sequential(OrderedDict(bn=nn.LazyBatchNorm2d()))
    with pytest.raises(ValueError, match=r"module 'bn' is an uninitialized LazyBatchNorm2d"):
        convert_sync_batchnorm(model)


@pytest.fixture
def single_process_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("setting", ["no process group", "group of one process"])
def test_single_process_runs_the_local_layer_without_collectives(
        setting: str, request: pytest.FixtureRequest) -> None:
    if setting == "group of one process":
        request.getfixturevalue("single_process_group")
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    synced, plain = SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    with CollectiveCounter() as counter:
        outputs = [layer(input) for layer, input in zip((synced, plain), inputs, strict=True)]
        for output in outputs:
            (output * torch.arange(output.numel()).view_as(output)).sum().backward()
    assert counter.calls == []
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


def test_syncbn_timeout_defaults_well_under_a_minute_and_is_checked() -> None:
    assert 0 < SyncBatchNorm(3).timeout < 60
    assert SyncBatchNorm(3, timeout=None).timeout is None
    for bad in (0, -1.0, "30"):
        with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds or "
                                             r"None, got"):
            SyncBatchNorm(3, timeout=bad)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), timeout=5.0)
    assert model[0].timeout == 5.0
