"""Channel groups: the sets of output channels that must be removed together.

A channel produced by one convolution is read by the next layer, normalised by a BatchNorm, maybe added
to a residual stream or concatenated with other feature maps. Torch-Pruning's DependencyGraph follows all
of this; a `ChannelGroup` is the plain, picklable summary of one of its groups that pruning methods score
and that a `ChannelPlan` refers to by name.

The group type lives in `channel_group`, layer facts in `layers`, traced reshapes in `reshapes` and attention heads in
`heads`; this module builds the traced graph, reads the groups from it and remembers them on the model and on disk.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.io import write_json
from prunelab.structure.channel_group import ChannelGroup
from prunelab.structure.heads import _head_group, _head_reader, _head_writers, attention_heads
from prunelab.structure.layers import (
    PRUNABLE_TYPES,
    _log_once,
    _norm_group,
    _stage_of,
    _unsupported_grouped,
    eval_mode,
    find_classifier,
    grouped_unit,
    out_channels,
    rms_norm_like,
    skipped,
)
from prunelab.structure.masks import has_masks
from prunelab.structure.pruners import customized_pruners
from prunelab.structure.reshapes import _chunk_sizes, _equal_split


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Any, nn.Module | None]:
    """Trace the model into a Torch-Pruning DependencyGraph, with the classifier's outputs protected."""
    # Imported here, not at the top, so that importing prunelab does not import Torch-Pruning.
    from prunelab.structure.tp_graph import Graph

    if has_masks(model):
        raise ValueError("the model has attached masks; fold them (fold_masks) before changing its channels")
    classifier = find_classifier(model, input_shape)
    param = next(model.parameters())
    example = torch.randn(1, *input_shape, device=param.device, dtype=param.dtype)
    # The classifier stays in the traced graph: Torch-Pruning's `ignored_layers` would drop it from
    # tracing altogether, and then its input side would not follow the last group. Its output side is
    # protected in `groups_from_graph` instead.
    with eval_mode(model), torch.enable_grad():
        graph = Graph().build_dependency(model, example_inputs=example, customized_pruners=customized_pruners())
    _drop_traced_caches(model)
    return graph, classifier


def _drop_traced_caches(model: nn.Module) -> None:
    """Forget tensors the traced forward pass left in modules' caches (timm's LeViT keeps attention biases
    per device in eval mode): made with gradients on, they would stop the model from being deep-copied."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())
            elif isinstance(value, dict) and any(
                isinstance(v, torch.Tensor) and v.grad_fn is not None for v in value.values()
            ):
                value.clear()


def _unit_of(group: Any, size: int) -> tuple[int, nn.Module | None]:
    """The channels a full pruning group removes together, and a grouped convolution that prevents it.

    Every grouped convolution the channels pass through asks for whole groups of its channels, so the
    unit is the least common multiple of their channels per group, counted in the root layer's
    channel order. Each convolution group must then lie inside one unit of the root's channels (a
    concatenation or a split on the way may shift or cut it); the first convolution for which that
    fails is returned, else None.
    """
    convs = [
        (item, k)
        for item in group
        if (k := grouped_unit(item.dep.target.module) or _norm_group(item.dep.target.module)) > 1
    ]
    unit = math.lcm(*(k for _, k in convs))
    for item, k in convs:
        blocks: dict[int, list[int]] = {}
        for index, root in zip(item.idxs, item.root_idxs):
            blocks.setdefault(index // k, []).append(root)
        whole = all(len(roots) == k and len({r // unit for r in roots}) == 1 for roots in blocks.values())
        if size % unit or not whole:
            return unit, item.dep.target.module
    return unit, None


def _order(item: Any, size: int) -> list[list[int]]:
    """A dependency's own channel indices for each of the group's channels (none, one, or several copies)."""
    order: list[list[int]] = [[] for _ in range(size)]
    for root, index in zip(item.root_idxs, item.idxs):
        order[int(root)].append(int(index))
    return [sorted(rows) for rows in order]


def groups_from_graph(
    model: nn.Module, graph: Any, classifier: nn.Module | None, skip: tuple[str, ...] = ()
) -> list[ChannelGroup]:
    """Read the groups of a built graph in module order (so names and order are deterministic).

    A group is kept whole (forms no group) where a module named by a `skip` pattern (`skipped`)
    produces or normalises its channels; a layer that only reads them does not keep them.
    """
    names = {module: name for name, module in model.named_modules()}
    attention = any(
        isinstance(m, nn.MultiheadAttention) or isinstance(getattr(m, "num_heads", None), int) for m in model.modules()
    )
    # Parameters outside conv/linear/norm layers (layer scales, embeddings) are graph nodes too: named by their module.
    names.update({param: name.rpartition(".")[0] for name, param in model.named_parameters()})
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    index_of = {name: i for i, (name, _) in enumerate(layers)}
    stages = _stage_of(model)
    visited: set[nn.Module] = set()
    groups: list[ChannelGroup] = []
    heads = attention_heads(model)
    for name in list(heads):
        # Heads are pruned through their projections: ones applied as functions (EVA's and timm Swin V2's `qkv`,
        # through F.linear with a bias of their own) are not traced, and the heads are kept whole.
        projections = [*_head_writers(model, name), _head_reader(model, name)]
        if any(model.get_submodule(layer) not in graph.module2node for layer in projections):
            _log_once(
                f"the heads of {name!r} are kept whole: its projection {projections[0]!r} is not called as a module"
            )
            del heads[name]
    # The layers that write the heads' queries, keys and values, by the attention they belong to.
    head_layers = {model.get_submodule(layer): name for name in heads for layer in _head_writers(model, name)}
    emitted: set[str] = set()
    unfollowed: dict[str, list[str]] = {}  # reason -> the groups kept whole for it, said in one line each
    with graph.reading():
        for name, module in layers:
            if module in head_layers and not (skip and skipped(name, skip)):
                if head_layers[module] not in emitted:
                    emitted.add(head_layers[module])
                    groups.append(_head_group(model, head_layers[module], index_of, stages))
                continue
            if module in visited or module is classifier or module not in graph.module2node:
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            size = int(pruner.get_out_channels(module))
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
            except (ArithmeticError, IndexError, ValueError, RuntimeError) as err:
                # A root kept whole anyway (`keep_whole`, said at creation; `structure.skip`, the user's) needs no
                # second reason.
                if not (getattr(module, "keep_whole", False) or (skip and skipped(name, skip))):
                    unfollowed.setdefault(f"{type(err).__name__}: {err}", []).append(name)
                continue
            producers = []
            norms: list[str] = []
            consumers: list[str] = []
            reads: dict[str, list[int]] = {}
            rows: dict[str, list[list[int]]] = {}
            identity = [[i] for i in range(size)]
            unmapped = None
            multiple = 1
            layer_norm = False
            merges: set[str] = set()
            prunable = True
            blocked: list[nn.Module] = []
            writing: list[nn.Module] = []  # grouped convolutions writing the channels (ResNeSt's radix convolution)
            chunked: dict[Any, set[tuple[int, int]]] = {}  # equal splits of the channels: (index, group channel) pairs
            overread: dict[str, tuple[int, list[int]]] = {}  # readers of more inputs than they have: fan-in, counts
            for item in group:
                dep = item.dep
                target = dep.target.module
                node = graph.module2node.get(target) if type(target).__name__ == "_SplitOp" else None
                if (
                    node is not None
                    and _equal_split(node.grad_fn, node.grad_fn in graph.last_dim_splits)
                    and None not in item.root_idxs
                ):
                    chunked.setdefault(node, set()).update(zip(map(int, item.idxs), map(int, item.root_idxs)))
                if (
                    isinstance(target, nn.modules.batchnorm._BatchNorm)
                    and target in names
                    and names[target] not in norms
                ):
                    norms.append(names[target])
                    order = _order(item, size)
                    if order != identity or target.num_features != size:
                        rows[names[target]] = order
                if _unsupported_grouped(target):
                    # One that only writes the channels may lose the same count in each of its groups (equal blocks,
                    # below).
                    (
                        writing
                        if graph.is_out_channel_pruning_fn(dep.handler) and out_channels(target) == size
                        else blocked
                    ).append(target)
                if isinstance(target, nn.MultiheadAttention):
                    multiple = math.lcm(multiple, target.num_heads)
                layer_norm = layer_norm or isinstance(target, nn.LayerNorm) or rms_norm_like(target)
                if type(target).__name__ == "_ElementWiseOp":
                    fn = getattr(target, "_grad_fn", None)
                    merges.add(fn if isinstance(fn, str) else type(fn).__name__)
                if any(
                    root is None for root in item.root_idxs
                ):  # the index mapping was lost on the way (e.g. through a reshape)
                    unmapped = (
                        unmapped
                        or "Torch-Pruning lost its channel indices on the way to "
                        f"{names.get(target, type(target).__name__)!r}"
                    )
                    continue
                reader = isinstance(target, PRUNABLE_TYPES) and grouped_unit(target) is None and target in names
                if reader and graph.is_in_channel_pruning_fn(dep.handler) and names[target] not in consumers:
                    consumers.append(names[target])
                    counts = [0] * size
                    for root in item.root_idxs:
                        counts[int(root)] += 1
                    if counts != [1] * size:
                        reads[names[target]] = counts
                    fan_in = target.in_features if isinstance(target, nn.Linear) else target.in_channels
                    if sum(counts) > fan_in:  # settled once ties are known (below)
                        overread[names[target]] = (fan_in, counts)
                if target in graph.unmapped:
                    unmapped = graph.unmapped[target]
                if not graph.is_out_channel_pruning_fn(dep.handler):
                    continue
                if target in head_layers:
                    # Torch-Pruning sees a qkv projection's rows as plain channels; its heads are a group of their own.
                    prunable = False
                if (skip and target in names and skipped(names[target], skip)) or getattr(target, "keep_whole", False):
                    prunable = False
                visited.add(target)
                if target is classifier:
                    prunable = False
                if isinstance(target, PRUNABLE_TYPES) and target in names and target not in producers:
                    producers.append(target)
                    order = _order(item, size)
                    if order != identity or out_channels(target) != size:
                        rows[names[target]] = order
            if not prunable:
                continue
            blocks, split_sizes, crossed = 1, [], False
            for node, pairs in chunked.items():
                chunks = _chunk_sizes(node.grad_fn)
                # Each channel of the split's input at its own place, or (ResNeSt's radix splits weighed by a softmax
                # across them) at its place in another chunk, which the blocks' ties must then explain (below).
                width = size // len(chunks) if size % len(chunks) == 0 else 0
                if sorted(pairs) != [(i, i) for i in range(size)]:
                    crossed = True
                if (
                    len(set(chunks)) > 1
                    or not width
                    or sorted(a for a, _ in pairs) != list(range(size))
                    or any(a % width != b % width for a, b in pairs)
                ):
                    unmapped = (
                        unmapped
                        or f"they are split by {node.name} into chunks {chunks}, not equal ones that hold all of them"
                    )
                    continue
                blocks = math.lcm(blocks, len(chunks))
                if node.grad_fn in graph.splits:
                    split_sizes.append(list(graph.splits[node.grad_fn]))
            # A grouped convolution writing the channels in its own order keeps the same count in each of its groups:
            # its groups are equal blocks (CPUBone's expanding convolutions, ResNeSt's radix splits).
            for conv in writing:
                if names.get(conv) in rows:
                    blocked.append(conv)
                elif conv not in blocked:
                    blocks = math.lcm(blocks, conv.groups)
            tied: list[int] | None = []
            if unmapped is None and (blocks > 1 or overread or _holds_part(rows, names)):
                tied = _tied_blocks(graph, module, pruner, size, blocks)
                if tied is None:
                    _log_once(
                        f"channel group {name!r} is kept whole: some of its channels are copies of others (a depthwise "
                        "copy concatenated with its input, as in GhostNet's ghost modules) at positions that do not "
                        "line up block by block, so they cannot be removed one by one"
                    )
                    continue
            if unmapped is None and crossed and len(tied) != blocks:
                unmapped = (
                    "a split's chunks are mapped onto each other's channels, and not every chunk is tied to the others"
                )
            for consumer, (fan_in, counts) in overread.items():
                # Tied blocks multiplied together (a gated MLP's halves) reach a reader's input once per block: counted
                # once.
                width = size // max(blocks, len(tied))
                counts = [n * (c // width not in tied[1:]) for c, n in enumerate(counts)]
                if sum(counts) > fan_in:  # e.g. a token-mixing Linear (ResMLP, MLP-Mixer) reading the transposed stream
                    unmapped = (
                        unmapped
                        or f"{consumer!r} would read {sum(counts)} of its {fan_in} inputs from them: it reads another "
                        "axis"
                    )
                reads[consumer] = counts
            if unmapped is not None:
                unfollowed.setdefault(unmapped, []).append(name)
                continue
            # Grouped convolutions lose whole groups (GroupedConvPruner); where a group cannot be removed
            # whole, the channels are kept, and the reason is logged once.
            unit, misaligned = _unit_of(group, size)
            if blocked or misaligned is not None:
                conv = blocked[0] if blocked else misaligned
                why = (
                    "its input and output groups differ in size"
                    if blocked
                    else f"its groups do not line up with blocks of {unit} of the group's channels"
                )
                what = (
                    f"the group norm {names.get(conv, type(conv).__name__)!r} ({conv.num_groups} groups of "
                    f"{conv.num_channels} channels)"
                    if isinstance(conv, nn.GroupNorm)
                    else f"the grouped convolution {names[conv]!r} (groups={conv.groups}, {conv.in_channels} -> "
                    f"{conv.out_channels} channels)"
                )
                _log_once(
                    f"channel group {name!r} is kept whole: it passes through {what}, and {why}, so no whole group of "
                    "it can be removed"
                )
                continue
            blocks = max(blocks, len(tied))
            others = sorted((m for m in producers if m is not module), key=lambda m: index_of[names[m]])
            members = [module, *others]
            groups.append(
                ChannelGroup(
                    name=name,
                    size=size,
                    layers=[names[m] for m in members],
                    stage=stages.get(name, 0),
                    layer_index=index_of[name],
                    coupled=sum(grouped_unit(m) is None for m in members) > 1,
                    norms=sorted(norms, key=list(names.values()).index),
                    unit=unit,
                    consumers=sorted(consumers, key=index_of.get),
                    merges=sorted(merges),
                    reads=reads,
                    rows=rows,
                    # Every block keeps whole units: counts per block are multiples of the unit.
                    multiple=math.lcm(multiple, blocks * unit) if blocks > 1 else multiple,
                    blocks=blocks,
                    split_sizes=split_sizes,
                    tied=tied,
                    embedding=attention and layer_norm and sum(grouped_unit(m) is None for m in members) > 1,
                )
            )
    for reason, kept in unfollowed.items():
        if len(kept) == 1:
            _log_once(f"channel group {kept[0]!r} is kept whole: Torch-Pruning cannot follow its channels ({reason})")
        else:
            listed = (
                f"{kept[0]!r}, {kept[1]!r} and {len(kept) - 2} more"
                if len(kept) > 2
                else f"{kept[0]!r} and {kept[1]!r}"
            )
            _log_once(f"channel groups {listed} are kept whole: Torch-Pruning cannot follow their channels ({reason})")
    return groups


def _holds_part(rows: dict[str, list[list[int]]], names: dict) -> bool:
    """Whether a grouped layer holds only part of a group (a ghost module's cheap copy): its channels may be copies."""
    by_name = {name: m for m, name in names.items() if isinstance(m, nn.Module)}
    return any(
        grouped_unit(by_name.get(layer, nn.Identity())) and any(not r for r in held) for layer, held in rows.items()
    )


def _tied_blocks(graph: Any, root: nn.Module, pruner: Any, size: int, blocks: int) -> list[int] | None:
    """The blocks of a group whose channel p goes with the others' channel p when it is removed (`ChannelGroup.tied`):
    none where each channel goes alone; else, of its `blocks` equal blocks (or, where it has none, of as many as
    channels go together), those holding the first channel's partners, at its position in each (a stream added to a
    ghost module's input and cheap copy; halves multiplied together; chunks added through grouped convolutions); None
    where they lie otherwise. Torch-Pruning's group of all channels hides it; the first and the last channel of the
    first block, walked alone, show it."""

    def partners(channel: int) -> set[int]:
        probe = graph.get_pruning_group(root, pruner.prune_out_channels, [channel])
        return {
            int(i)
            for item in probe
            if item.dep.target.module is root and graph.is_out_channel_pruning_fn(item.dep.handler)
            for i in item.idxs
        }

    first = partners(0)
    if len(first) == 1:
        return []
    blocks = blocks if blocks > 1 else len(first)
    width = size // blocks
    tied = sorted(c // width for c in first)
    if (
        size % blocks
        or first != {b * width for b in tied}
        or partners(width - 1) != {b * width + width - 1 for b in tied}
    ):
        return None
    return tied


def channel_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[ChannelGroup]:
    """All prunable channel groups of a model, in module order of their root layers.

    `input_shape` is one example's (C, H, W); the model is traced once on a random input, in eval
    mode, so its BatchNorm statistics do not move. Channels that pass through a grouped convolution
    which cannot lose a whole group (its input and output groups differ in size, or its groups do not
    line up with the group's channels) are kept whole: they form no group, and a warning says why.
    So are the channels produced by a layer named in the model record's `skip` (`structure.skip`),
    and a transformer's embedding width (`ChannelGroup.embedding`) unless the record's
    `prune_embedding` is set (`structure.prune_embedding`).
    The groups are remembered on the model with its parameter and buffer shapes, so asking again
    before the architecture changes does not trace again.
    """
    key = _groups_key(model, input_shape)
    _, _, skip, embedding, *_ = key
    cached = model.__dict__.get("_prunelab_groups")
    if cached is not None and cached[0] == key:
        return copy.deepcopy(cached[1])
    graph, classifier = build_graph(model, tuple(input_shape))
    groups = groups_from_graph(model, graph, classifier, skip)
    if not embedding:
        groups = [g for g in groups if not g.embedding]
    model.__dict__["_prunelab_groups"] = (key, copy.deepcopy(groups))
    return groups


GROUPS_FORMAT = 3  # ChannelGroup's fields as remember_groups writes them (2: rows hold lists of rows; 3: split_sizes)


def _groups_key(model: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    record = model.__dict__.get("prunelab")
    return (
        GROUPS_FORMAT,
        tuple(input_shape),
        tuple(getattr(record, "skip", ())),
        bool(getattr(record, "prune_embedding", False)),
        bool(getattr(record, "prune_head_dim", False)),
        _signature(model),
        # What the code decided at creation (layers kept whole, `backbones.attention.relayout`), and the code's version:
        # groups saved by another prunelab are found again.
        tuple(name for name, m in model.named_modules() if getattr(m, "keep_whole", False)),
        _version(),
    )


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunelab")
    except PackageNotFoundError:
        return "unknown"


def remember_groups(model: nn.Module, input_shape: tuple[int, ...], path: Path, checked: bool = False) -> bool:
    """Keep the model's channel groups in a file of the run directory, so that a resumed run does not trace
    the model again to find them; returns whether the file already held them with `checked` set (a
    `check_prunable` passed on them). With `checked`, records that it did."""
    key = hashlib.sha256(repr(_groups_key(model, input_shape)).encode()).hexdigest()
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            groups = [ChannelGroup(**g) for g in saved["groups"]]
            model.__dict__["_prunelab_groups"] = (_groups_key(model, input_shape), groups)
            if not checked:
                return bool(saved.get("checked"))
    groups = channel_groups(model, input_shape)
    write_json(path, {"key": key, "checked": checked, "groups": [asdict(g) for g in groups]})
    return checked


def _signature(model: nn.Module) -> tuple:
    """Names and shapes of every parameter and buffer: what changes when channels are removed or masks attached."""
    return tuple((name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers()))
