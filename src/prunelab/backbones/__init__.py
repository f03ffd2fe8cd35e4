"""Backbone registry and model families.

Every family module registers its factories with the `register` decorator when it is imported, so
importing this package makes all names available to `create`. Names that start with `timm:` or
`torchvision:` are built by those libraries without downloading anything. A class of the user's own is
built from its `_target_` node by `from_target` (`backbone=custom backbone._target_=my_pkg.MyNet`).
"""

# Importing the family modules runs their `register` decorators and so fills the registry (and registers their
# custom modules' pruners with structure, `customized_pruners`).
from prunelab.backbones import cifar_resnet, imagenet_resnet, mobilenet, vgg, wrn  # noqa: F401
from prunelab.backbones.registry import available, create, load_pretrained, register, scale_channels
from prunelab.backbones.user import from_target, rebuild
from prunelab.structure.pruners import customized_pruners

__all__ = [
    "available",
    "create",
    "customized_pruners",
    "from_target",
    "load_pretrained",
    "rebuild",
    "register",
    "scale_channels",
]
