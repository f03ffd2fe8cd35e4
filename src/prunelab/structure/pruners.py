"""Torch-Pruning pruning functions for custom modules, registered by the code that defines the modules.

A backbone family whose modules Torch-Pruning does not know (the CIFAR ResNets' parameter-free shortcut) registers
a factory of their pruning function here when it is imported, and every dependency graph that structure builds
uses them; structure never imports the backbones. A model holding such a module was built by its family, so the
family's registration has run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_FACTORIES: dict[type[nn.Module], Callable[[], Any]] = {}


def register_pruner(module_type: type[nn.Module], factory: Callable[[], Any]) -> None:
    """Make `factory()` (a Torch-Pruning pruning function, built on first use so that importing the module that
    registers it does not import Torch-Pruning) the pruner of `module_type`; a second, different factory for the same
    type is refused."""
    known = _FACTORIES.get(module_type)
    if known is not None and known is not factory:
        raise ValueError(f"a pruner for {module_type.__qualname__} is already registered ({known.__qualname__})")
    _FACTORIES[module_type] = factory


def customized_pruners() -> dict[type[nn.Module], Any]:
    """Torch-Pruning pruning functions for every registered custom module.

    Pass them as `customized_pruners=` to `torch_pruning.DependencyGraph().build_dependency` or to a
    Torch-Pruning pruner; without them the parameter-free option-A shortcut of the CIFAR ResNets
    couples channels wrongly.
    """
    return {module_type: factory() for module_type, factory in _FACTORIES.items()}
