"""Channel surgery: physically removing the channels a ChannelPlan drops, and re-initialising.

The removal itself is Torch-Pruning's: its DependencyGraph knows which BatchNorms, following layers,
residual partners, depthwise convolutions and concatenations each channel touches.
"""

from __future__ import annotations

from torch import nn

from prunelab.structure.groups import build_graph, grouped_unit, groups_from_graph
from prunelab.structure.masks import attach_masks, fold_masks, has_masks, masks_of
from prunelab.structure.plans import ChannelPlan, model_record


def apply_channel_plan(model: nn.Module, plan: ChannelPlan, input_shape: tuple[int, int, int]) -> nn.Module:
    """Remove every channel the plan does not keep, in place, and return the model.

    The plan's group names and sizes must match the model's current groups; a plan made for another
    architecture (or for this one before an earlier plan shrank it), or one that splits a unit of a
    group read by a grouped convolution (`ChannelGroup.unit`), is refused before anything changes.
    Applied plans accumulate in the model's record (`model.prunelab.plans`), in order, so that a saved
    model can be rebuilt by replaying them on a fresh one.
    """
    graph, classifier = build_graph(model, tuple(input_shape))
    groups = {g.name: g for g in groups_from_graph(model, graph, classifier)}
    for name, size in plan.sizes.items():
        if name not in groups:
            raise ValueError(
                f"the plan was made for another architecture: the model has no channel group {name!r} "
                f"(groups: {', '.join(groups)})"
            )
        if groups[name].size != size:
            raise ValueError(
                f"the plan was made for another architecture: group {name!r} has {groups[name].size} "
                f"channels, the plan expects {size}"
            )
        split = _split_unit(plan.keep[name], groups[name].unit)
        if split is not None:
            unit = groups[name].unit
            convs = [layer for layer in groups[name].layers if (grouped_unit(model.get_submodule(layer)) or 1) > 1]
            raise ValueError(
                f"the plan splits a unit of group {name!r}: its channels pass through the grouped convolution(s) "
                f"{', '.join(convs)} and are kept or removed in whole units of {unit}, but only some of channels "
                f"{split * unit}-{(split + 1) * unit - 1} are kept"
            )
    # Groups are disjoint, so removing one group's channels leaves the indices of the others valid.
    for name, kept in plan.keep.items():
        kept_set = set(kept)
        removed = [i for i in range(plan.sizes[name]) if i not in kept_set]
        if not removed:
            continue
        root = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, idxs=removed)
        group.prune()
    model_record(model).plans.append(plan)
    return model


def _split_unit(kept: list[int], unit: int) -> int | None:
    """The first unit of `unit` consecutive channels that `kept` holds only partly, or None."""
    counts: dict[int, int] = {}
    for index in kept:
        counts[index // unit] = counts.get(index // unit, 0) + 1
    return next((j for j, n in sorted(counts.items()) if n != unit), None)


def reinitialize(model: nn.Module) -> nn.Module:
    """Give the model's current (possibly pruned) layers a fresh initialisation, for training from scratch.

    A model with an `init_weights` method (every prunelab family) uses its own scheme, so fans follow
    the pruned shapes; others get each submodule's `reset_parameters`. Attached masks stay attached,
    with the same masks, over the new weights.
    """
    masks = masks_of(model) if has_masks(model) else None
    if masks is not None:
        recorded = model_record(model).masks
        fold_masks(model)
    init = getattr(model, "init_weights", None)
    if callable(init):
        init()
    else:
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    if masks is not None:
        attach_masks(model, masks)
        if recorded is not None:
            model_record(model).masks = recorded
    return model
