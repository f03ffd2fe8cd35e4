"""Backbone registry and model families.

Every family module registers its factories with the `register` decorator when it is imported, so
importing this package makes all names available to `create`. Names that start with `timm:` or
`torchvision:` are built by those libraries without downloading anything.
"""

from prunelab.backbones.registry import available, create, load_pretrained, register, scale_channels
from prunelab.structure.pruners import customized_pruners

# Importing the family modules runs their `register` decorators and so fills the registry (and registers their
# custom modules' pruners with structure, `customized_pruners`).
from prunelab.backbones import cifar_resnet, imagenet_resnet, mobilenet, vgg, wrn  # noqa: E402,F401

__all__ = ["available", "create", "customized_pruners", "load_pretrained", "register", "scale_channels"]
