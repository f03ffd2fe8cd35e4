"""Backbone registry and model families.

Every family module registers its factories with the `register` decorator when it is imported, so
importing this package makes all names available to `create`. Names that start with `timm:` or
`torchvision:` are built by those libraries without downloading anything. A class of the user's own is
built from its `_target_` node by `from_target` (`backbone=custom backbone._target_=my_pkg.MyNet`).
"""

from typing import Any

from torch import nn

from prunelab.backbones.registry import available, create, load_pretrained, register, scale_channels
from prunelab.backbones.user import from_target, rebuild

# Importing the family modules runs their `register` decorators and so fills the registry.
from prunelab.backbones import cifar_resnet, imagenet_resnet, mobilenet, vgg, wrn  # noqa: E402,F401


def customized_pruners() -> dict[type[nn.Module], Any]:
    """Torch-Pruning pruning functions for the custom modules of all families.

    Pass them as `customized_pruners=` to `torch_pruning.DependencyGraph().build_dependency` or to a
    Torch-Pruning pruner; without them the parameter-free option-A shortcut of the CIFAR ResNets
    couples channels wrongly.
    """
    return {**cifar_resnet.customized_pruners()}


__all__ = ["available", "create", "customized_pruners", "from_target", "load_pretrained", "rebuild", "register", "scale_channels"]
