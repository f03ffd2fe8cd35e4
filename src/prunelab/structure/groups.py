"""Channel groups: the sets of output channels that must be removed together.

A channel produced by one convolution is read by the next layer, normalised by a BatchNorm, maybe added
to a residual stream or concatenated with other feature maps. Torch-Pruning's DependencyGraph follows all
of this; a `ChannelGroup` is the plain, picklable summary of one of its groups that pruning methods score
and that a `ChannelPlan` refers to by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The layer types whose output channels form groups, and that count in `layer_index`.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass
class ChannelGroup:
    """One prunable set of channels, named after its root layer.

    `name` is the qualified name of the first conv/linear layer (in module order) whose output
    channels are the group's; `layers` lists every conv/linear layer producing these channels, root
    first (depthwise convolutions fed by the group are included, as their outputs are the same
    channels); `stage` counts the model's top-level children that hold a conv/linear layer, and
    `layer_index` counts all conv/linear layers in module order. `coupled` marks residual streams:
    more than one layer other than a depthwise convolution writes these channels. `norms` names the
    BatchNorm layers that normalise these channels (what Network Slimming scores).
    """

    name: str
    size: int
    layers: list[str] = field(default_factory=list)
    stage: int = 0
    layer_index: int = 0
    coupled: bool = False
    norms: list[str] = field(default_factory=list)


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


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
    spec = getattr(model, "prunelab_spec", None)
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


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Any, nn.Module | None]:
    """Trace the model into a Torch-Pruning DependencyGraph, with the classifier's outputs protected."""
    import torch_pruning as tp

    from prunelab.backbones import customized_pruners

    # Imported here because masks -> plans -> groups would otherwise be a circular import.
    from prunelab.structure.masks import has_masks

    if has_masks(model):
        raise ValueError("the model has attached masks; fold them (fold_masks) before changing its channels")
    classifier = find_classifier(model, input_shape)
    param = next(model.parameters())
    example = torch.randn(1, *input_shape, device=param.device, dtype=param.dtype)
    # The classifier stays in the traced graph: Torch-Pruning's `ignored_layers` would drop it from
    # tracing altogether, and then its input side would not follow the last group. Its output side is
    # protected in `groups_from_graph` instead.
    with eval_mode(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=customized_pruners()
        )
    return graph, classifier


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


def groups_from_graph(model: nn.Module, graph: Any, classifier: nn.Module | None) -> list[ChannelGroup]:
    """Read the groups of a built graph in module order (so names and order are deterministic)."""
    names = {module: name for name, module in model.named_modules()}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    index_of = {name: i for i, (name, _) in enumerate(layers)}
    stages = _stage_of(model)
    visited: set[nn.Module] = set()
    groups: list[ChannelGroup] = []
    for name, module in layers:
        if module in visited or module is classifier or module not in graph.module2node:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        size = int(pruner.get_out_channels(module))
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        producers = []
        norms: list[str] = []
        prunable = True
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, nn.modules.batchnorm._BatchNorm) and target in names and names[target] not in norms:
                norms.append(names[target])
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            visited.add(target)
            if target is classifier:
                prunable = False
            if isinstance(target, PRUNABLE_TYPES) and target in names and target not in producers:
                producers.append(target)
        if not prunable:
            continue
        others = sorted((m for m in producers if m is not module), key=lambda m: index_of[names[m]])
        members = [module, *others]
        groups.append(
            ChannelGroup(
                name=name,
                size=size,
                layers=[names[m] for m in members],
                stage=stages.get(name, 0),
                layer_index=index_of[name],
                coupled=sum(not _is_depthwise(m) for m in members) > 1,
                norms=sorted(norms, key=list(names.values()).index),
            )
        )
    return groups


def channel_groups(model: nn.Module, input_shape: tuple[int, int, int]) -> list[ChannelGroup]:
    """All prunable channel groups of a model, in module order of their root layers.

    `input_shape` is one example's (C, H, W); the model is traced once on a random input, in eval
    mode, so its BatchNorm statistics do not move.
    """
    graph, classifier = build_graph(model, tuple(input_shape))
    return groups_from_graph(model, graph, classifier)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"the model has no layer {name!r} (the group was found on another architecture)") from err


def root_weights(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """The root layer's weight, output channels first: what channel-scoring methods usually read."""
    return _module(model, group.name).weight


def group_weights(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """The weights of every layer producing the group's channels (root first), output channels first."""
    return [_module(model, name).weight for name in group.layers]
