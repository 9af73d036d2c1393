"""State dicts move between torch.nn layers and ours in both directions, including the
versions torch migrates (pre-``num_batches_tracked`` BatchNorm, pre-running-stats
InstanceNorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm

PAIRS = [("BatchNorm1d", (3,)), ("BatchNorm2d", (3,)), ("BatchNorm3d", (3,)),
         ("InstanceNorm2d", (3,)), ("GroupNorm", (1, 3)), ("LayerNorm", (3,))]


def _randomized(module: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.fill_(7)
    return module


@pytest.mark.parametrize(("name", "args"), PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trips_with_identical_keys_and_values(name, args, direction):
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in name else {}
    source_lib, target_lib = (nn, batchnorm) if direction == "torch_to_ours" else (batchnorm, nn)
    source = _randomized(getattr(source_lib, name)(*args, **kwargs))
    target = getattr(target_lib, name)(*args, **kwargs)
    target.load_state_dict(source.state_dict())
    assert list(target.state_dict()) == list(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.state_dict(keep_vars=False)._metadata[""]["version"] == \
        source.state_dict()._metadata[""]["version"]


def test_version_1_batch_norm_state_dict_without_num_batches_tracked_loads_like_torch():
    old = _randomized(nn.BatchNorm2d(3)).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    loaded = []
    for library in (nn, batchnorm):
        layer = library.BatchNorm2d(3)
        layer.num_batches_tracked.fill_(5)
        layer.load_state_dict(old)
        loaded.append(layer.state_dict())
    assert list(loaded[0]) == list(loaded[1])
    for key, value in loaded[0].items():
        assert torch.equal(loaded[1][key], value), key


def test_unversioned_instance_norm_state_dict_with_running_stats_is_rejected_like_torch():
    old = nn.InstanceNorm2d(3, track_running_stats=True).state_dict()
    old._metadata[""]["version"] = None
    errors = []
    for library in (nn, batchnorm):
        with pytest.raises(RuntimeError) as info:
            library.InstanceNorm2d(3).load_state_dict(old)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
