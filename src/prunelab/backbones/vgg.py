"""VGG with BatchNorm in its common CIFAR form (as in Network Slimming and Pruning from Scratch).

`features` holds conv3x3-BN-ReLU layers and 'M' max-pools; the last max-pool of the ImageNet layout
is dropped, global average pooling reduces to 1x1, and `classifier` is a single Linear layer.

The initialisation is Pruning from Scratch's official one (frankwang345/pruning-from-scratch) except for
the BatchNorm scale: that code starts every BN weight at 0.5, prunelab at 1 (`bn_weight` chooses).
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.backbones.registry import fan_out_init, register, scale_channels

LayerSpec = list[int | str]

CONFIGS: dict[str, LayerSpec] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
    "vgg_tiny": [8, "M", 16, "M", 32],
}


class VGG(nn.Module):
    """Plain conv-BN-ReLU stack with max-pools, global average pooling and one linear classifier."""

    def __init__(
        self, cfg: LayerSpec, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, bn_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.bn_weight = float(bn_weight)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_channels = scale_channels(int(item), width)
                layers += [
                    nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming (fan_out) convolutions, BatchNorm weight `bn_weight` and bias 0, small-normal classifier.

        Fans follow the current shapes.
        """
        fan_out_init(self, linear_std=0.01)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, self.bn_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


def _register(name: str) -> None:
    @register(name)
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, bn_weight: float = 1.0) -> VGG:
        return VGG(CONFIGS[name], num_classes, in_channels, width, bn_weight)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR {name} with BatchNorm."


for _name in CONFIGS:
    _register(_name)
