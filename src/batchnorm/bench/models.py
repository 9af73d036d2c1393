"""The architectures the end-to-end rows train, written with ``torch.nn`` layers (the
bench converts a copy with :func:`batchnorm.convert`), so the bench needs neither
torchvision nor timm. Each follows its published definition; ``width`` arguments only
shrink them for the ``--tiny`` smoke run."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) shortcut: ResNet's basic block (He et al.,
    2016). ``shortcut_bias`` gives the projection conv a bias, so folding must merge the BN
    into an existing one."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: type[nn.Module],
                 shortcut_bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm(channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == channels else \
            nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=shortcut_bias),
                          norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem without max-pool, then four stages
    of two basic blocks (width, 2, 4, 8 x width channels; strides 1, 2, 2, 2), global
    average pooling and a linear classifier; 20 BatchNorm2d at width 64."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        out_channels = width * 2**stage
        layers += [ResidualBlock(channels, out_channels, stride, nn.BatchNorm2d),
                   ResidualBlock(out_channels, out_channels, 1, nn.BatchNorm2d)]
        channels = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


def _divisible(value: float, divisor: int = 8) -> int:
    """MobileNetV2's channel rounding: nearest multiple of ``divisor``, at most 10 % down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped at ratio 1), 3x3 depthwise, linear 1x1 projection, each
    followed by BN; the identity shortcut when stride 1 keeps the channel count."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [] if expansion == 1 else [_conv_bn_relu6(in_channels, hidden, 1)]
        self.body = nn.Sequential(
            *layers, _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, repeats n, first stride s), Sandler et al. 2018, table 2.
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(num_classes: int = 200, width_mult: float = 1.0) -> nn.Sequential:
    """MobileNetV2 (stem 3x3 stride 2 to 32 channels, 17 inverted residual blocks, 1x1 to
    1280, average pool, dropout 0.2, linear), channel rounding as in the reference
    implementation; 52 BatchNorm2d. 200 classes: the 64x64 Tiny-ImageNet setting."""
    channels = _divisible(32 * width_mult)
    last = _divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = [_conv_bn_relu6(3, channels, 3, 2)]
    for expansion, stage_channels, repeats, stride in _MOBILENET_V2_STAGES:
        out_channels = _divisible(stage_channels * width_mult)
        for index in range(repeats):
            layers.append(InvertedResidual(channels, out_channels, stride if index == 0
                                           else 1, expansion))
            channels = out_channels
    return nn.Sequential(*layers, _conv_bn_relu6(channels, last, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(last, num_classes))


def tf_tutorial_mlp() -> nn.Sequential:
    """The TensorFlow batch-normalization tutorial's MNIST net: 784 -> six hidden layers of
    100 (linear without bias, BN, leaky ReLU with TF's default slope 0.2) -> 10."""
    layers: list[nn.Module] = []
    features = 784
    for _ in range(6):
        layers += [nn.Linear(features, 100, bias=False), nn.BatchNorm1d(100),
                   nn.LeakyReLU(0.2)]
        features = 100
    return nn.Sequential(*layers, nn.Linear(features, 10))


def hands_on_ml_mlp() -> nn.Sequential:
    """Hands-On Machine Learning (Géron), chapter 11's BN example: BN on the flattened
    input, then dense 300 and 100 with ELU each followed by BN, then 10 logits."""
    return nn.Sequential(nn.BatchNorm1d(784), nn.Linear(784, 300), nn.ELU(),
                         nn.BatchNorm1d(300), nn.Linear(300, 100), nn.ELU(),
                         nn.BatchNorm1d(100), nn.Linear(100, 10))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al., 2022): 7x7 depthwise conv, LayerNorm over the channels
    of each pixel (channels-last view), 4x MLP with GELU, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(),
                                 nn.Linear(4 * channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm(self.depthwise(x).permute(0, 2, 3, 1)))
        return x + out.permute(0, 3, 1, 2)


class GroupNormBlock(nn.Module):
    """conv-GN-ReLU-conv-GN plus the identity, ReLU: ResNet's basic block with GroupNorm
    (Wu and He, 2018, 32 groups)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def gn_ln_net(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """A batch-independent CNN for 32x32 inputs: conv-GN-ReLU stem, a GroupNorm residual
    block, a stride-2 conv-GN-ReLU, a ConvNeXt block (LayerNorm over channels), average
    pooling and a LayerNorm + linear head: 4 GroupNorm, 2 LayerNorm."""
    groups = min(32, width // 2)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width), nn.ReLU(),
        GroupNormBlock(width, groups),
        nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.GroupNorm(groups, 2 * width),
        nn.ReLU(), ConvNeXtBlock(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.LayerNorm(2 * width), nn.Linear(2 * width, num_classes))
