"""Wide Residual Networks (Zagoruyko & Komodakis, 2016) with pre-activation blocks.

Depth 6n+4 gives n blocks in each of three groups of 16k/32k/64k channels (k = widen_factor); the width
multiplier scales every channel count on top of that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.backbones.registry import fan_out_init, register, scale_channels


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with an identity or 1x1-conv shortcut.

    When the shape changes, the shortcut convolution reads the pre-activated input, as in the
    reference implementation.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut: nn.Module = nn.Identity()
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        if self.equal_in_out:
            return out + x
        return out + self.shortcut(pre)


class WideResNet(nn.Module):
    """WRN-depth-k: stem conv, three groups of wide blocks, BN-ReLU, global pooling, `fc`."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        blocks_per_group = (depth - 4) // 6
        stem = scale_channels(16, width)
        widths = [scale_channels(c * widen_factor, width) for c in (16, 32, 64)]

        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = stem
        groups = []
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for index in range(blocks_per_group):
                blocks.append(WideBasicBlock(in_planes, planes, stride if index == 0 else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The reference scheme: Kaiming (fan_out) convolutions, unit BatchNorm, zero linear bias."""
        fan_out_init(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


@register("wrn")
def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet of any depth 6n+4 and widen factor."""
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels, width)


@register("wrn_16_4")
def wrn_16_4(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    """WRN-16-4."""
    return WideResNet(16, 4, dropout, num_classes, in_channels, width)


@register("wrn_28_10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10."""
    return WideResNet(28, 10, dropout, num_classes, in_channels, width)


@register("wrn_tiny")
def wrn_tiny(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    """WRN-10-1, one block per group, for fast tests."""
    return WideResNet(10, 1, dropout, num_classes, in_channels, width)
