"""ImageNet ResNets (He et al., 2016): 7x7 stride-2 stem, max-pool, four stages, `fc` classifier.

Module names match torchvision's ResNet (conv1, bn1, layer1..4, downsample.0/.1, fc), so torchvision
weights load at width 1. The width multiplier scales every channel count, which torchvision's class
cannot do for the stem and stage widths, hence this small implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.backbones.registry import fan_out_init, register, scale_channels


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; `planes` is the output width."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, width: float) -> None:
        super().__init__()
        out_planes = scale_channels(planes * self.expansion, width)
        mid = scale_channels(planes, width)
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.out_planes = out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's v1.5), 1x1 expand by 4, with a residual."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, width: float) -> None:
        super().__init__()
        out_planes = scale_channels(planes * self.expansion, width)
        mid = scale_channels(planes, width)
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.out_planes = out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages, global pooling, `fc`."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        stem = scale_channels(base_channels, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = stem
        stages = []
        for index, repeats in enumerate(layers):
            planes = base_channels * 2**index
            blocks = []
            for position in range(repeats):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(in_planes, planes, stride, width))
                in_planes = blocks[-1].out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """torchvision's scheme: Kaiming (fan_out) convolutions, unit BatchNorm; fans follow current shapes."""
        fan_out_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


@register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ImageNetResNet:
    """ImageNet ResNet-18."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


@register("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ImageNetResNet:
    """ImageNet ResNet-34."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width)


@register("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottleneck blocks)."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


@register("resnet_imagenet_tiny")
def resnet_imagenet_tiny(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ImageNetResNet:
    """One basic block per stage, 16/32/64/128 channels, for fast tests."""
    return ImageNetResNet(BasicBlock, [1, 1, 1, 1], num_classes, in_channels, width, base_channels=16)
