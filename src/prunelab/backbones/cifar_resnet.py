"""He et al. (2016) ResNets for CIFAR: depth 6n+2, three stages of 16/32/64 channels.

Parameter names follow the widely used reference implementation (conv1, bn1, layer1..3, linear), so
its published checkpoints load directly. Option A shortcuts zero-pad channels and subsample; option B
uses a 1x1 convolution with BatchNorm where the shape changes.

Two initialisations: "reference" (the reference implementation's: Kaiming-normal with fan_in on conv and
linear weights, everything else as PyTorch builds it) and "pfs_official" (Pruning from Scratch's
official code, frankwang345/pruning-from-scratch: Kaiming-normal with fan_out on every convolution,
shortcuts included, BatchNorm weight 1 and bias 0, the linear layer as PyTorch initialises it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.backbones.registry import register, scale_channels
from prunelab.structure.pruners import register_pruner

INITS = ("reference", "pfs_official")


class PadShortcut(nn.Module):
    """Parameter-free shortcut (option A): subsample spatially and zero-pad new channels on both sides.

    Output channel j copies input channel `index[j]`, or is zero where `index[j] == in_channels`. A fresh
    shortcut puts the input in the middle, (out - in) // 2 zero channels before it and the rest after,
    which is the reference's planes // 4 on each side. Keeping the map explicit lets channel pruning
    remove input and output channels independently (see `PadShortcutPruner`); the map is a
    non-persistent buffer, so state dicts are those of the reference.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        pad_front = (out_channels - in_channels) // 2
        pad_back = out_channels - in_channels - pad_front
        index = [in_channels] * pad_front + list(range(in_channels)) + [in_channels] * pad_back
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # Append one zero channel, then gather: slots that point past the input read zeros.
        x = F.pad(x, (0, 0, 0, 0, 0, 1), "constant", 0.0)
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _pad_shortcut_pruner() -> Any:
    """A Torch-Pruning pruning function for `PadShortcut`, so residual channels can be removed across it.

    Input and output channels are pruned independently: removing an output channel drops its slot,
    removing an input channel turns the slots that copied it into zero slots.
    """
    import torch_pruning as tp

    class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = (PadShortcut,)

        def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
            removed = {int(i) for i in idxs}
            keep = [j for j in range(layer.out_channels) if j not in removed]
            layer.index = layer.index[keep].clone()
            layer.out_channels = len(keep)
            return layer

        def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
            removed = {int(i) for i in idxs}
            kept = [i for i in range(layer.in_channels) if i not in removed]
            zero_slot = len(kept)
            remap = {old: new for new, old in enumerate(kept)}
            layer.index = torch.tensor(
                [remap.get(int(i), zero_slot) for i in layer.index],
                dtype=torch.long,
                device=layer.index.device,
            )
            layer.in_channels = len(kept)
            return layer

        def get_out_channels(self, layer: PadShortcut) -> int:
            return layer.out_channels

        def get_in_channels(self, layer: PadShortcut) -> int:
            return layer.in_channels

    return PadShortcutPruner()


register_pruner(PadShortcut, _pad_shortcut_pruner)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, with ReLU after the addition."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """Three-stage ResNet with global average pooling and a linear classifier named `linear`."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        shortcut: str = "A",
        init: str = "reference",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.init = init
        blocks_per_stage = (depth - 2) // 6
        widths = [scale_channels(c, width) for c in (16, 32, 64)]

        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise all layers by the chosen scheme (`init`), with fans taken from the current shapes."""
        if self.init == "pfs_official":
            # Pruning from Scratch's official code: conv weights from N(0, 2 / (k * k * out_channels)),
            # BatchNorm (1, 0), and the linear layer left at PyTorch's default. Reset all three, so that a
            # re-initialisation after training is as fresh as a new model.
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, (nn.BatchNorm2d, nn.Linear)):
                    module.reset_parameters()
            return
        # The reference initialises conv and linear weights with Kaiming-normal (fan_in) only.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register("cifar_resnet")
def cifar_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    depth: int = 20,
    shortcut: str = "A",
    init: str = "reference",
) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2."""
    return CifarResNet(depth, num_classes, in_channels, width, shortcut, init)


def _register_depth(name: str, depth: int) -> None:
    @register(name)
    def factory(
        num_classes: int = 10, in_channels: int = 3, width: float = 1.0, shortcut: str = "A", init: str = "reference"
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, width, shortcut, init)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}."


@register("wrn20")
def wrn20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, shortcut: str = "B") -> CifarResNet:
    """The "WideResNet-20" of the lottery-ticket literature (open_lth's cifar_resnet_20_64, the concave-
    regularizers paper): ResNet-20 with 64/128/256 channels and 1x1-convolution shortcuts."""
    return CifarResNet(20, num_classes, in_channels, 4.0 * width, shortcut)


# The tiny variant (depth 8, one block per stage) exists for fast tests.
for _name, _depth in (
    ("resnet_tiny", 8),
    ("resnet20", 20),
    ("resnet32", 32),
    ("resnet44", 44),
    ("resnet56", 56),
    ("resnet110", 110),
):
    _register_depth(_name, _depth)
