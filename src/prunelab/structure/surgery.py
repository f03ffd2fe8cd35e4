"""Channel surgery: physically removing the channels a ChannelPlan drops, and re-initialising.

The removal itself is Torch-Pruning's: its DependencyGraph knows which BatchNorms, following layers,
residual partners, depthwise convolutions and concatenations each channel touches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunelab.errors import UnprunableError
from prunelab.structure.channel_group import channels_written, keep_count
from prunelab.structure.groups import build_graph, channel_groups, groups_from_graph
from prunelab.structure.heads import check_head_plan, head_layout, prune_heads
from prunelab.structure.layers import PRUNABLE_TYPES, _channels, _log_once, eval_mode, grouped_unit, skipped
from prunelab.structure.masks import attach_masks, fold_masks, has_masks, masks_of, zero_masked_
from prunelab.structure.plans import ChannelPlan, model_record
from prunelab.structure.reshapes import resize_slices, resize_splits


def apply_channel_plan(model: nn.Module, plan: ChannelPlan, input_shape: tuple[int, ...]) -> nn.Module:
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
        if groups[name].heads is not None:
            check_head_plan(model, groups[name], plan.keep[name])
            continue
        counts = _block_counts(plan.keep[name], groups[name])
        width = groups[name].size // groups[name].blocks
        if len({tuple(i % width for i in plan.keep[name] if i // width == b) for b in groups[name].tied}) > 1:
            raise ValueError(
                f"the plan keeps other positions in blocks {groups[name].tied} of group {name!r} ({width} channels "
                "each): channel p of each goes with the others' channel p, so they must keep the same positions"
            )
        if len(set(counts)) > 1:
            raise ValueError(
                f"the plan keeps {counts} channels of the {len(counts)} equal chunks of group {name!r}: a split into "
                f"equal chunks ({groups[name].size // len(counts)} channels each) must keep the same number in each"
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
    plan = _no_empty_parts(plan, groups)
    before = _own_shapes(model)
    # Groups are disjoint, so removing one group's channels leaves the indices of the others valid.
    for name, kept in plan.keep.items():
        kept_set = set(kept)
        removed = [i for i in range(plan.sizes[name]) if i not in kept_set]
        if not removed:
            continue
        if groups[name].heads is not None:
            prune_heads(model, groups[name], kept)
            continue
        root = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, idxs=removed).prune()
        resize_splits(model, groups[name], len(kept))
    resize_slices(model, graph)
    _update_bookkeeping(model, before)
    model_record(model).plans.append(plan)
    return model


def _no_empty_parts(plan: ChannelPlan, groups: dict) -> ChannelPlan:
    """The plan, keeping one channel more where it would empty a layer that holds or reads only part of a
    group (a part of MixNet's mixed convolutions: a convolution cannot have no channels)."""
    keep = {name: list(kept) for name, kept in plan.keep.items()}
    for name, kept in keep.items():
        group = groups[name]
        parts = [[c for c, r in enumerate(rows) if r] for layer, rows in group.rows.items() if layer in group.layers]
        parts += [[c for c, n in enumerate(counts) if n] for counts in group.reads.values()]
        for held in parts:
            if held and len(held) < group.size and not set(held) & set(kept):
                unit, width = group.unit, group.size // group.blocks
                first = range(held[0] // unit * unit, (held[0] // unit + 1) * unit)
                tied = group.tied if held[0] // width in group.tied else []
                positions = [c % width + b * width for c in first for b in tied] or first
                kept.extend(i for i in positions if i not in kept)
                _log_once(f"group {name!r} keeps channel {held[0]}: the plan removed every channel a layer holds of it")
    if keep == plan.keep:
        return plan
    return ChannelPlan({name: sorted(kept) for name, kept in keep.items()}, dict(plan.sizes))


# Layers whose size attributes Torch-Pruning's own pruners update.
_SIZED_BY_TP = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.MultiheadAttention,
    nn.PReLU,
    nn.Embedding,
)


_WIDTH_NAMES = ("dim", "channel", "shape", "feature", "width", "planes")


def _own_shapes(model: nn.Module) -> dict[nn.Module, dict[str, tuple[int, ...]]]:
    """The shapes of each module's own parameters, for modules whose size attributes nobody else updates (attention
    modules whose heads prune keep their own books: `prune_heads`)."""
    return {
        m: {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False)}
        for m in model.modules()
        if not isinstance(m, _SIZED_BY_TP)
        and any(True for _ in m.parameters(recurse=False))
        and not _keeps_own_books(m)
    }


def _keeps_own_books(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_heads", None), int) and (
        isinstance(getattr(module, "qkv", None), nn.Linear) or head_layout(module) is not None
    )


def _update_bookkeeping(model: nn.Module, before: dict[nn.Module, dict[str, tuple[int, ...]]]) -> None:
    """Give a module the sizes its pruned parameters now have, in the attributes that recorded the old ones.

    A module of the model's own (timm's layer scale keeps `shape = (dim, 1, 1)`, torchvision's
    VisionTransformer `hidden_dim` beside its class token) reshapes with such attributes: an int
    attribute equal to a dimension that changed, or a tuple holding one, takes the new size when its
    name says it is a width (`_WIDTH_NAMES`; `image_size` may equal `hidden_dim` by chance).
    check_prunable runs the pruned model, so a wrong guess is refused before any training. Attention
    modules whose heads prune keep their own books (`prune_heads`): Swin-B's `head_dim` equals its head count.
    """
    for module in model.modules():
        # A module that splits its input among its child convolutions by recorded sizes (timm's MixedConv2d,
        # MixNet's mixed kernels): the sizes its parts now read.
        splits, parts = getattr(module, "splits", None), list(module.children())
        if isinstance(splits, (list, tuple)) and parts and len(splits) == len(parts):
            if all(isinstance(c, nn.modules.conv._ConvNd) for c in parts):
                module.splits = type(splits)(c.in_channels for c in parts)
                for key in ("in_channels", "out_channels"):
                    if isinstance(getattr(module, key, None), int):
                        setattr(module, key, sum(getattr(c, key) for c in parts))
    for module, shapes in before.items():
        sizes = {}
        for name, shape in shapes.items():
            now = tuple(getattr(module, name).shape)
            sizes.update({old: new for old, new in zip(shape, now) if old != new})
        if not sizes:
            continue
        for key, value in list(vars(module).items()):
            if key.startswith("_") or isinstance(value, bool) or not any(w in key.lower() for w in _WIDTH_NAMES):
                continue
            if isinstance(value, int) and value in sizes:
                setattr(module, key, sizes[value])
            elif (
                isinstance(value, tuple)
                and value
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            ) and any(v in sizes for v in value):
                setattr(module, key, tuple(sizes.get(v, v) for v in value))


def check_prunable(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse, in one line naming the layers, a model whose channel groups cannot all lose channels.

    On a copy of the model every group loses about half its channels, every other unit
    (`_trial_removed`), at once and the copy runs a forward pass; where that fails, halves of the groups
    are tried, down to single groups (the copy's modules are put back after each try), to find the ones
    that break it alone. The
    error names, per failing group, the innermost module that was running when the forward pass
    failed (or the group's root layer where the removal itself failed) and the reason, and suggests
    the `structure.skip` that keeps them whole; where no group fails alone, it names what failed.
    """
    groups = [g for g in channel_groups(model, input_shape) if _trial_removed(g)]
    if not groups:
        return
    # With BatchNorm alone, zeroing a channel's weights and affine parameters silences it exactly, so
    # the pruned copy must compute what the dense model computes with the removed channels zeroed. So it
    # does for attention heads in any model (zeroed query, key and value rows: the head adds nothing), so head
    # groups are removed and compared first, then the others.
    other_norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
    trial = copy.deepcopy(model)
    graph, _ = build_graph(trial, tuple(input_shape))
    # A layer that standardises its weight (NFNets) standardises it anew over the inputs it keeps, and a map added to
    # the channels (Visformer's position embeddings, (1, C, H, W)) keeps them alive: no zeroing of layers matches.
    added = any(
        p.dim() == 4 and p.shape[0] == 1 and p.shape[1] > 1 and p.shape[2:].numel() > 1
        for m in model.modules() if not isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters(recurse=False)
    )  # fmt: skip
    # timm's norms over channels need not subclass torch's (RmsNorm2d, MobileNetV5): told by their class names too.
    by_name = re.compile(r"(Layer|Rms|RMS|Group|Instance|Simple)Norm")
    normalising = any(
        isinstance(m, other_norms) or any(by_name.match(c.__name__) for c in type(m).__mro__) for m in model.modules()
    )
    exact = not normalising and not graph.reshapes.get("parameters") and not added
    dense = copy.deepcopy(model) if exact or any(g.heads for g in groups) else None
    param = next(trial.parameters())
    x = torch.randn(2, *input_shape, device=param.device, dtype=param.dtype)
    heads, others = [g for g in groups if g.heads], [g for g in groups if not g.heads]
    if exact:
        together = _breaks(trial, graph, groups, x, dense)
    else:
        together = _breaks(trial, graph, heads, x, dense) if heads else None
        heads_broke = together is not None
        if together is None and others:
            together = _breaks(trial, graph, others, x, None)
    if together is None:
        return
    trial = copy.deepcopy(model)
    graph, _ = build_graph(trial, tuple(input_shape))
    saved = _state(trial, graph)

    def failing(candidates: list, reference: nn.Module | None, found: tuple[str, str] | None = None) -> dict:
        """The groups among `candidates` (which break the model together where `found` is given) that break it alone,
        found by halving: a set that runs holds none (one forward pass for many groups: a 300M-parameter model ran
        past minutes trying each group alone)."""
        if found is None:
            found = _breaks(trial, graph, candidates, x, reference)
            _restore(saved)
        if found is None:
            return {}
        if len(candidates) == 1:
            return {candidates[0].name: found}
        half = len(candidates) // 2
        return {**failing(candidates[:half], reference), **failing(candidates[half:], reference)}

    if exact:
        failures = failing(groups, dense, together)
    elif heads_broke:  # the other groups were not tried
        failures = {**failing(heads, dense, together), **(failing(others, None) if others else {})}
    else:
        failures = failing(others, None, together)
    failures = {g.name: failures[g.name] for g in groups if g.name in failures}  # in module order
    if not failures:
        layer, reason = together
        raise UnprunableError(
            f"cannot prune the channel groups together: removing channels of all {len(groups)} groups at once "
            f"breaks {layer!r} ({reason}), though no group does alone; set structure.skip=[...] to keep some whole"
        )
    by_name = {g.name: g for g in groups}
    # The failing layer where skipping it keeps the group whole (it holds one of the group's layers), else the group's
    # root.
    keep = [layer if skipped_by(by_name[name], layer) else name for name, (layer, _) in failures.items()]
    # Repeated blocks fail alike: one pattern per layer name with its block numbers as wildcards.
    where = sorted({re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", layer) for layer in keep})
    name, (layer, reason) = next(iter(failures.items()))
    others = f" and {len(failures) - 1} more group(s)" if len(failures) > 1 else ""
    raise UnprunableError(
        f"cannot prune channels of {', '.join(repr(w) for w in where)} (removing channels of group {name!r}{others} "
        f"breaks {layer!r}: {reason}); set structure.skip=[{','.join(where)}] to keep "
        f"{'it' if len(where) == 1 else 'them'} whole and prune the rest"
    )


def skipped_by(group, pattern: str) -> bool:
    """Whether `structure.skip=[pattern]` keeps the group whole, as far as its named layers tell."""
    return any(skipped(name, (pattern,)) for name in [*group.layers, *group.norms])


def _breaks(model: nn.Module, graph, groups: list, x: torch.Tensor, dense: nn.Module | None) -> tuple[str, str] | None:
    """Remove about half of each group's channels (`_trial_removed`) and run the model: None, or (module, reason) of the
    failure.

    Besides an error, a failure is a conv/linear layer whose channels changed otherwise than the
    groups say (a dependency the graph maps wrongly, e.g. through a slice), or, given the `dense`
    model (BatchNorm models only), an output other than the dense model's with the removed channels
    zeroed (a channel permutation followed wrongly, e.g. through a shuffle).
    """
    # Layers the graph traced (a MultiheadAttention's out_proj is pruned by its parent's pruner, not traced).
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES) and m in graph.module2node}
    expected = {name: _channels(m) for name, m in layers.items()}
    before = _own_shapes(model)
    for group in groups:
        root = model.get_submodule(group.name)
        removed = _trial_removed(group)
        for name in group.layers:
            written = channels_written(group, name)
            lost = len(removed) if written is None else sum(written[i] for i in removed)
            fan_in, fan_out = expected[name]
            expected[name] = (fan_in - lost if grouped_unit(layers[name]) is not None else fan_in, fan_out - lost)
        for name in group.consumers:
            reads = group.reads.get(name)
            fan_in, fan_out = expected[name]
            expected[name] = (fan_in - sum(1 if reads is None else reads[i] for i in removed), fan_out)
        try:
            if group.heads is not None:
                prune_heads(model, group, [i for i in range(group.size) if i not in set(removed)])
                # Its own per-head layers (Swin V2's position-bias MLP) lose the removed heads with it.
                own = {f"{group.heads}.{n}": m for n, m in model.get_submodule(group.heads).named_modules() if n}
                expected.update(
                    {
                        n: _channels(m)
                        for n, m in own.items()
                        if n in expected and n not in (*group.layers, *group.consumers)
                    }
                )
            else:
                graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=removed).prune()
                resize_splits(model, group, group.size - len(removed))
        except Exception as err:  # noqa: BLE001 - any failure of the removal is the reason to report
            return group.name, _reason(err)
    resize_slices(model, graph)
    _update_bookkeeping(model, before)
    for name, m in layers.items():
        if _channels(m) != expected[name]:
            return (
                name,
                f"its (input, output) channels became {_channels(m)}, the channel groups expect {expected[name]}",
            )
    running: list[str] = []
    try:
        with _innermost(model, running), eval_mode(model), torch.no_grad():
            model(x)
    except Exception as err:  # noqa: BLE001 - any failure of the forward pass is the reason to report
        return (running[-1] if running else groups[0].name), _reason(err)
    if dense is not None:
        with eval_mode(model), torch.no_grad():
            pruned = model(x)
        with _silenced(dense, groups), eval_mode(dense), torch.no_grad():
            expected = dense(x)
        error = float((pruned - expected).abs().max())
        if error > 1e-3 * float(expected.abs().max()) + 1e-5:
            return groups[0].name, (
                f"the pruned model's outputs differ from the dense model's with the removed channels silenced "
                f"(max difference {error:.3g}): the channels are mapped wrongly somewhere"
            )
    return None


@contextmanager
def _silenced(model: nn.Module, groups: list) -> Iterator[None]:
    """Zero the weights, biases and BatchNorm affine parameters of the channels `_trial_removed` takes from each
    group."""
    saved = []
    with torch.no_grad():
        for group in groups:
            removed = _trial_removed(group)
            for name in [*group.layers, *group.norms]:
                module = model.get_submodule(name)
                rows = group.rows.get(name)
                if (
                    rows is None and group.heads is not None
                ):  # timm's stacked qkv: a channel's query, key and value rows
                    rows = [[i + part * group.size for part in range(3)] for i in range(group.size)]
                index = torch.tensor(
                    [r for i in removed for r in (rows[i] if rows is not None else [i])], dtype=torch.long
                )
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        saved.append((tensor, tensor[index].clone(), index))
                        tensor[index] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, values, index in reversed(saved):
                tensor[index] = values


def _trial_removed(group) -> list[int]:
    """About half of the group's channels, every other unit, so that it keeps a valid count (`keep_count`);
    in a group of equal blocks (`ChannelGroup.blocks`), every other unit of each block, shifted by one unit from
    block to block so that a mapping that mixes the blocks up shows (tied blocks: the same units in each)."""
    if group.blocks > 1:
        unit = group.unit
        units = group.size // group.blocks // unit
        return sorted(
            (b * units + (j + b * (b not in group.tied)) % units) * unit + i  # tied blocks lose the same positions
            for b in range(group.blocks)
            for j in range(1, units, 2)
            for i in range(unit)
        )

    units = group.size // group.unit
    kept = keep_count(group.size // 2, group.size, 1, group.unit, group.multiple) // group.unit
    order = [j for j in range(units) if j % 2] + [j for j in reversed(range(units)) if j % 2 == 0]
    return sorted(i for j in order[: units - kept] for i in range(j * group.unit, (j + 1) * group.unit))


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")


@contextmanager
def _innermost(model: nn.Module, running: list[str]) -> Iterator[None]:
    """Keep in `running` the names of the modules whose forward pass has started and not ended."""
    named = [(name, m) for name, m in model.named_modules() if name]

    def start(name: str):
        return lambda _module, _inputs: running.append(name)

    def end(_module, _inputs, _output) -> None:
        running.pop()

    handles = [m.register_forward_pre_hook(start(name)) for name, m in named]
    handles += [m.register_forward_hook(end) for _, m in named]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _state(model: nn.Module, graph) -> tuple[list, list]:
    """What removing channels changes: each module's attributes (shallow copies: its parameter, buffer and child tables
    copied) and each tensor's data (Torch-Pruning replaces the data of parameters it does not own)."""
    modules = {id(m): m for m in [*model.modules(), *graph.module2node] if isinstance(m, nn.Module)}
    attributes = [(m, {k: _shallow(v) for k, v in vars(m).items()}) for m in modules.values()]
    return attributes, [(t, t.data) for t in [*model.parameters(), *model.buffers()]]


def _shallow(value: object) -> object:
    """A copy of a container (parameter tables, concat sizes), the object itself otherwise (autograd nodes cannot be
    copied)."""
    return copy.copy(value) if isinstance(value, (dict, list, set)) else value


def _restore(saved: tuple[list, list]) -> None:
    attributes, data = saved
    for module, values in attributes:
        vars(module).clear()
        vars(module).update({k: _shallow(v) for k, v in values.items()})
    for tensor, value in data:
        tensor.data = value


def _block_counts(kept: list[int], group) -> list[int]:
    """How many channels the plan keeps of each of a group's equal blocks (`ChannelGroup.blocks`)."""
    width = group.size // group.blocks
    return [sum(1 for i in kept if i // width == b) for b in range(group.blocks)]


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
    with the same masks, over the new weights; masks only in the model's record (a pruned model between
    stages) zero the new weights they mask out, so the weights stay exactly zero there.
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
    elif model_record(model).masks is not None:
        zero_masked_(model, model_record(model).masks)
    return model
