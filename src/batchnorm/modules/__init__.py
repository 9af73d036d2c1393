"""Normalization layers: thin modules that pick their axes and call the core."""

from batchnorm.modules.batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from batchnorm.modules.convert import convert, revert
from batchnorm.modules.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    unfreeze,
)
from batchnorm.modules.instancenorm import (
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
)
from batchnorm.modules.layernorm2d import LayerNorm2d
from batchnorm.modules.normalization import GroupNorm, LayerNorm
from batchnorm.modules.syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "GroupNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "LayerNorm2d", "LazyBatchNorm1d",
    "LazyBatchNorm2d", "LazyBatchNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d",
    "LazyInstanceNorm3d", "SyncBatchNorm", "convert", "convert_sync_batchnorm", "freeze",
    "revert", "revert_sync_batchnorm", "unfreeze",
]
