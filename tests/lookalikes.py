"""Plain copies of the shapes of two norm layers from timm and torchvision, written for the
convert and fold tests (neither library is a test dependency).

* ``BatchNormAct2d``: timm's norm+activation layer, a ``BatchNorm2d`` subclass (so its
  state_dict is the plain layer's) whose forward applies ``drop`` then ``act``;
* ``LayerNorm2d``: timm's and torchvision's ConvNeXt layer, an ``nn.LayerNorm`` over the
  channels of NCHW input: permute to NHWC, normalize the last dim, permute back.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: type[nn.Module] = nn.ReLU, act_kwargs: dict[str, Any] | None = None,
                 drop_layer: type[nn.Module] | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(**(act_kwargs or {})) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class LayerNorm2d(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
