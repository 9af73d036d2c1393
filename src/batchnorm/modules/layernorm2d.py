"""LayerNorm over the channels of NCHW input: ConvNeXt's ``LayerNorm2d`` (timm, torchvision).

Statistics are per sample and pixel over the C channels, ``y[n, :, h, w] =
layer_norm(x[n, :, h, w])``; this is not ``GroupNorm(1, C)``, which pools C, H and W.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm.modules.normalization import LayerNorm

__all__ = ["LayerNorm2d"]


class LayerNorm2d(LayerNorm):
    """:class:`batchnorm.LayerNorm` with ``normalized_shape=C`` applied to dim 1 of
    (N, C, H, W) input; parameters and state_dict keys are those of the LayerNorm."""

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {input.dim()}D input of "
                             f"size {list(input.shape)}")
        if torch.jit.is_scripting():  # which has no super()
            return self._scripted_forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
