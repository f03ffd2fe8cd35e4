"""MobileNet V1 (depthwise separable convolutions) and V2 (inverted residuals, linear bottlenecks).

`variant="imagenet"` uses the published strides for 224x224 inputs. `variant="cifar"` keeps the first
convolution at stride 1 (and, in V2, the second stage too) so that 32x32 inputs keep enough resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.backbones.registry import fan_out_init, register, scale_channels

VARIANTS = ("cifar", "imagenet")

# V1 layers after the stem: (output channels, stride).
V1_LAYERS: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip
V1_TINY_LAYERS: list[tuple[int, int]] = [(16, 1), (32, 2), (64, 2)]

# V2 stages: (expansion t, output channels c, repeats n, ImageNet stride s, CIFAR stride).
V2_STAGES: list[tuple[int, int, int, int, int]] = [
    (1, 16, 1, 1, 1),
    (6, 24, 2, 2, 1),
    (6, 32, 3, 2, 2),
    (6, 64, 4, 2, 2),
    (6, 96, 3, 1, 1),
    (6, 160, 3, 2, 2),
    (6, 320, 1, 1, 1),
]
V2_TINY_STAGES: list[tuple[int, int, int, int, int]] = [
    (1, 8, 1, 1, 1),
    (2, 16, 2, 2, 1),
    (2, 24, 1, 2, 2),
]


def _check_variant(variant: str) -> None:
    if variant == "auto":
        raise ValueError(
            "variant 'auto' is resolved from the dataset's image size by the prunelab pipeline; "
            f"pass one of {VARIANTS} when building a MobileNet directly"
        )
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int, activation: type[nn.Module]
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """Depthwise conv3x3-BN-ReLU followed by pointwise conv1x1-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_act(in_channels, in_channels, 3, stride, in_channels, nn.ReLU)
        self.pointwise = _conv_bn_act(in_channels, out_channels, 1, 1, 1, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """Stem conv3x3, a stack of depthwise separable blocks, global pooling and `classifier`."""

    def __init__(
        self,
        layers: list[tuple[int, int]] = V1_LAYERS,
        stem_channels: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        variant: str = "cifar",
    ) -> None:
        super().__init__()
        _check_variant(variant)
        channels = scale_channels(stem_channels, width)
        self.stem = _conv_bn_act(in_channels, channels, 3, 2 if variant == "imagenet" else 1, 1, nn.ReLU)
        blocks = []
        for out_channels, stride in layers:
            out_channels = scale_channels(out_channels, width)
            blocks.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming (fan_out) convolutions, unit BatchNorm, small-normal classifier; fans follow current shapes."""
        fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.avgpool(out), 1))


class InvertedResidual(nn.Module):
    """Expand (1x1, ReLU6), depthwise 3x3 (ReLU6), project (1x1, linear); residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_act(in_channels, hidden, 1, 1, 1, nn.ReLU6))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, hidden, nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv3x3, inverted residual stages, a 1x1 head conv, global pooling and `classifier`."""

    def __init__(
        self,
        stages: list[tuple[int, int, int, int, int]] = V2_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        variant: str = "cifar",
    ) -> None:
        super().__init__()
        _check_variant(variant)
        imagenet = variant == "imagenet"
        channels = scale_channels(stem_channels, width)
        self.stem = _conv_bn_act(in_channels, channels, 3, 2 if imagenet else 1, 1, nn.ReLU6)
        blocks = []
        for expansion, out_channels, repeats, imagenet_stride, cifar_stride in stages:
            out_channels = scale_channels(out_channels, width)
            for index in range(repeats):
                stride = (imagenet_stride if imagenet else cifar_stride) if index == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        self.features = nn.Sequential(*blocks)
        head = scale_channels(head_channels, width)
        self.head = _conv_bn_act(channels, head, 1, 1, 1, nn.ReLU6)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming (fan_out) convolutions, unit BatchNorm, small-normal classifier; fans follow current shapes."""
        fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(self.stem(x)))
        return self.classifier(torch.flatten(self.avgpool(out), 1))


@register("mobilenet_v1")
def mobilenet_v1(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, variant: str = "cifar"
) -> MobileNetV1:
    """MobileNet V1 (13 depthwise separable blocks, 1024 final channels)."""
    return MobileNetV1(V1_LAYERS, 32, num_classes, in_channels, width, variant)


@register("mobilenet_v1_tiny")
def mobilenet_v1_tiny(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, variant: str = "cifar"
) -> MobileNetV1:
    """Three-block MobileNet V1 with at most 64 channels, for fast tests."""
    return MobileNetV1(V1_TINY_LAYERS, 8, num_classes, in_channels, width, variant)


@register("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, variant: str = "cifar"
) -> MobileNetV2:
    """MobileNet V2 (17 inverted residual blocks, 1280-channel head)."""
    return MobileNetV2(V2_STAGES, 32, 1280, num_classes, in_channels, width, variant)


@register("mobilenet_v2_tiny")
def mobilenet_v2_tiny(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, variant: str = "cifar"
) -> MobileNetV2:
    """Four-block MobileNet V2 with a 64-channel head, for fast tests."""
    return MobileNetV2(V2_TINY_STAGES, 8, 64, num_classes, in_channels, width, variant)
