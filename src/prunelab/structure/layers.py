"""Layers as channel groups see them: the prunable layer types, a layer's channels and grouping, norms, a model's
stages and classifier, `structure.skip` patterns, and running a model in eval mode or frozen."""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger("prunelab")

# The one definition of a prunable layer: its output channels form groups (and count in
# `layer_index`), and its weight is what unstructured methods mask.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def grouped_unit(module: nn.Module) -> int | None:
    """Channels per group of a grouped convolution whose outputs follow its inputs, group by group.

    Such a convolution (groups > 1 and as many output as input channels; a depthwise one has one
    channel per group) computes group j of its outputs from group j of its inputs only, so its
    channels belong to the group that feeds it and are removed one whole convolution group at a
    time. None for every other layer.
    """
    if (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.groups > 1
        and module.in_channels == module.out_channels
    ):
        return module.in_channels // module.groups
    return None


def _unsupported_grouped(module: nn.Module) -> bool:
    """A grouped convolution that cannot lose whole groups: its input and output groups differ in size."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and grouped_unit(module) is None


@functools.cache
def _log_once(message: str) -> None:
    """Log a message once per process: groups are read again for every candidate of a budget search."""
    log.warning(message)


def prunable_weights(model: nn.Module, dense_output: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The weights of the prunable layers in module order, by parameter name: what unstructured methods mask.

    With `dense_output` the last prunable layer (the classifier of every prunelab backbone) is left out,
    e.g. open_lth's VGG and the lottery-jackpots code keep it dense. A weight with an attached mask is
    named as the plain weight (`conv.weight`), and its current, masked value is returned.
    """
    weights = [
        (f"{name}.weight" if name else "weight", m.weight)
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and m.weight is not None
    ]
    return weights[:-1] if dense_output and weights else weights


def freeze(model: nn.Module) -> dict[str, bool]:
    """Stop gradients to every parameter of the model; returns the flags that `unfreeze` puts back."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def unfreeze(model: nn.Module, flags: dict[str, bool]) -> None:
    """Give each parameter back the `requires_grad` flag `freeze` recorded (True for parameters it did not see)."""
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv or linear layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run a block in eval mode, then give every submodule back its own training flag.

    Tracing runs a forward pass; in training mode it would move BatchNorm running statistics.
    """
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def find_classifier(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
    """The final output layer: the last Linear (else conv) whose output size equals the model's output.

    Its output side is never pruned; its input side follows the group that feeds it.
    """
    spec = model.__dict__["prunelab"].spec if "prunelab" in model.__dict__ else None
    if spec is not None and "num_classes" in spec:
        num_outputs = int(spec["num_classes"])
    else:
        param = next(model.parameters())
        with eval_mode(model), torch.no_grad():
            output = model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
        num_outputs = int(output.shape[1])
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    for kind in (nn.Linear, nn.Conv2d):
        matches = [m for m in layers if isinstance(m, kind) and out_channels(m) == num_outputs]
        if matches:
            return matches[-1]
    return layers[-1] if layers else None


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _stage_of(model: nn.Module) -> dict[str, int]:
    """Map every conv/linear layer name to the index of its top-level child, counting only children with one."""
    stages: dict[str, int] = {}
    stage = 0
    for child_name, child in model.named_children():
        names = [n for n, m in child.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        if not names:
            continue
        for name in names:
            stages[f"{child_name}.{name}" if name else child_name] = stage
        stage += 1
    return stages


def rms_norm_like(module: nn.Module) -> bool:
    """A norm over the last or channel dimension with a `normalized_shape` and a per-channel `weight` that subclasses
    no norm Torch-Pruning knows: torch's RMSNorm, timm's RmsNorm / RmsNorm2d / SimpleNorm families (told by class
    name)."""
    shape = getattr(module, "normalized_shape", None)
    return _rms_named(type(module)) and isinstance(shape, tuple) and len(shape) == 1


@functools.cache
def _rms_named(cls: type) -> bool:
    # Asked for every module of every group's walk: the class names are read once per class.
    return issubclass(cls, nn.RMSNorm) or any(re.match(r"(Rms|RMS|Simple)Norm", c.__name__) for c in cls.__mro__)


def _norm_group(module: nn.Module) -> int:
    """Channels per group of a GroupNorm of several groups, which loses whole groups (1 for any other module)."""
    return module.num_channels // module.num_groups if isinstance(module, nn.GroupNorm) and module.num_groups > 1 else 1


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module name is one of `structure.skip`'s patterns, lies inside one, or matches one as a glob."""
    return any(
        name == p or name.startswith(f"{p}.") or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}.*")
        for p in patterns
    )
