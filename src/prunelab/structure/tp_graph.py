"""prunelab's Torch-Pruning dependency graph: Torch-Pruning used through its extension points, never patched.

`Graph` subclasses Torch-Pruning's DependencyGraph, and everything prunelab changes lives in this graph instance:
its own pruners (registered in the graph's pruner table, or chosen in `get_pruner_of_module`), its own index-mapping
pass (`map_indices`, which calls Torch-Pruning's per-operation mappings and corrects their results), and its own walk
of a group (`get_pruning_group`, with `BoundedGroup`). No attribute of Torch-Pruning's modules or classes is assigned,
so Torch-Pruning's own pruners in the same process give exactly what they give without prunelab.

Imported on first use (`groups.build_graph`), so that importing prunelab does not import Torch-Pruning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Number
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping, _SplitIndexMapping
from torch_pruning.pruner import function

from prunelab.structure.layers import PRUNABLE_TYPES, _channels, grouped_unit, rms_norm_like
from prunelab.structure.reshapes import (
    _chunk_sizes,
    _equal_split,
    _ReshapeRecorder,
    _saved_dim,
    _splits_channels,
    _splits_channels_dim,
)

# How often a group's walk may reach one node with other channels before it is taken as going round without end, and
# the fewest indices one step may carry (`walk_limit`).
WALK_REVISITS = 16
WALK_MIN_INDICES = 4096


def walk_limit(model: nn.Module) -> int:
    """How many indices one step of a group's walk may carry: twice the widest input or output of any layer (a flatten
    into a classifier carries C x H x W, VGG's 25,088 at 224 pixels), at least WALK_MIN_INDICES."""
    widths = [n for m in model.modules() if isinstance(m, PRUNABLE_TYPES) for n in _channels(m)]
    return max(WALK_MIN_INDICES, 2 * max(widths, default=0))


def _no_channels(idxs: list) -> list:
    """An index mapping that maps to nothing: the walk of a group ends where it is."""
    return []


def _beside_matmul(node: Any) -> bool:
    """Whether a graph node feeds or is fed by a matrix product of tensors of four or more dimensions (attention
    with a heads dimension), which autograd computes as views and expansions to three around a batched product."""
    for n in (*node.inputs, *node.outputs):
        if type(n.grad_fn).__name__ == "BmmBackward0":
            operands = [fn for fn, _ in n.grad_fn.next_functions if fn is not None]
            if any(len(getattr(fn, "_saved_self_sym_sizes", ())) >= 4 for fn in operands):
                return True
    return False


def _op_kind(node: Any) -> str:
    """A graph node's name without the running number and arguments Torch-Pruning gives an operation
    (`_ConcatOp_1862(None)` -> `_ConcatOp`), so that a reason met at many of them is said once."""
    return re.sub(r"^(_\w+Op)_\d+\(.*\)$", r"\1", node.name)


def _extra_rows(layer: nn.Module) -> list[str]:
    """A convolution's own parameters besides weight and bias with one entry per output channel (timm's
    ScaledStdConv2d `gain`), which its pruner must cut with the rows."""
    return [
        n
        for n, p in layer.named_parameters(recurse=False)
        if n not in ("weight", "bias") and p.dim() and p.shape[0] == layer.out_channels
    ]


class BoundedGroup(Group):
    """A group under construction whose walk is stopped with a RuntimeError where it reaches a node with other channels
    again and again (more than WALK_REVISITS times), or carries more than `limit` indices (more than any layer has):
    index mappings round a cycle (views, an expansion and a batched product of timm's lambda layers; EfficientViT-M's
    window views) that give new indices at every turn never end, and the group grows without bound."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.arrivals: dict[Any, int] = {}

    def add_dep(self, dep: Any, idxs: Any) -> None:
        self.arrivals[dep.target] = self.arrivals.get(dep.target, 0) + 1
        if self.arrivals[dep.target] > WALK_REVISITS:
            raise RuntimeError(f"its channel mapping goes round {dep.target.name} without settling")
        if len(idxs) > self.limit:  # flatten mappings round a cycle multiply the indices at every turn
            raise RuntimeError(f"its channel mapping expands to {len(idxs)} indices at {dep.target.name}")
        super().add_dep(dep, idxs)

    def carry(self, dep: Any, idxs: list) -> list:
        """The indices `idxs` of a dependency's source as indices of its target, through its index mappings in order.
        A flatten is checked before it builds its list: round a cycle one builds millions of indices
        (EfficientViT-M)."""
        for mapping in dep.index_mapping:
            if mapping is None:
                continue
            if (
                isinstance(mapping, _FlattenIndexMapping)
                and not mapping.reverse
                and len(idxs) * mapping._stride > self.limit
            ):
                raise RuntimeError(f"its channel mapping expands to {len(idxs) * mapping._stride} indices at a flatten")
            idxs = mapping(idxs)
        return idxs


class _KeepsNone:
    """Mixed into a Torch-Pruning pruner: a parameter the layer does not have (None) stays None.

    Torch-Pruning's norm pruners cut `bias` whenever the norm is affine; a norm made without one (timm's
    GroupNorm1NoBias in PoolFormer v2) failed with "'NoneType' object has no attribute 'device'".
    """

    def _prune_parameter_and_grad(self, weight: Any, keep_idxs: Any, pruning_dim: int) -> Any:
        return None if weight is None else super()._prune_parameter_and_grad(weight, keep_idxs, pruning_dim)


class BatchNormPruner(_KeepsNone, function.BatchnormPruner):
    """Torch-Pruning's BatchNorm pruner, for a norm without weight or bias too."""


class InstanceNormPruner(_KeepsNone, function.InstanceNormPruner):
    """Torch-Pruning's InstanceNorm pruner, for a norm without weight or bias too."""


class GroupNormPruner(_KeepsNone, function.GroupNormPruner):
    """Torch-Pruning's GroupNorm pruner, which keeps `num_groups`: a GroupNorm of G > 1 groups (ResNetV2's GroupNormAct,
    32) loses whole groups (`groups._unit_of`), and its count follows."""

    def prune_out_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
        per_group = layer.num_channels // layer.num_groups
        layer = super().prune_out_channels(layer, idxs)
        if layer.num_groups > 1:
            layer.num_groups = layer.num_channels // per_group
        return layer

    prune_in_channels = prune_out_channels


class NormWeightPruner(tp.pruner.function.BasePruningFunc):
    """Cuts a `rms_norm_like` norm's weight (and bias, where it has one) and its `normalized_shape`.

    Without it Torch-Pruning cut the weight as a parameter no layer holds and left `normalized_shape`, so a
    transformer's stream through RMSNorms (DeepSeek's and Gemma 4's ViTs) broke the norm, and was not known as
    the embedding width (`ChannelGroup.embedding`) that prunelab keeps by default.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        size = layer.normalized_shape[0]
        keep = torch.tensor(sorted(set(range(size)) - {int(i) for i in idxs}))
        for attr in ("weight", "bias"):
            if isinstance(getattr(layer, attr, None), nn.Parameter):
                setattr(layer, attr, self._prune_parameter_and_grad(getattr(layer, attr), keep, 0))
        layer.normalized_shape = (len(keep),)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.normalized_shape[0]

    get_in_channels = get_out_channels


# Chosen over keeping grouped convolutions whole: coupling both sides, as for depthwise ones, keeps ResNeXt prunable.
class GroupedConvPruner(tp.pruner.function.ConvPruner):
    """Removes whole groups of a grouped convolution whose outputs follow its inputs (`grouped_unit`).

    Removing a group removes its input and its output channels together, and `groups` drops by
    one: like Torch-Pruning's depthwise pruner, one function prunes both sides, so the graph joins
    the layers feeding the convolution and those reading it into one channel group. Indices that
    split a group are refused.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        unit = layer.in_channels // layer.groups
        removed = sorted({int(i) for i in idxs})
        blocks = {i // unit for i in removed}
        if len(removed) != len(blocks) * unit:
            raise ValueError(
                f"grouped convolution with groups={layer.groups}: channels are removed in whole groups of "
                f"{unit}, but the indices {removed} split a group"
            )
        keep = [i for i in range(layer.out_channels) if i // unit not in blocks]
        for name in ("weight", "bias", *_extra_rows(layer)):
            if getattr(layer, name) is not None:
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
        layer.in_channels = layer.out_channels = len(keep)
        layer.groups -= len(blocks)
        return layer

    prune_in_channels = prune_out_channels


class ExtrasConvPruner(tp.pruner.function.ConvPruner):
    """Torch-Pruning's convolution pruner, also keeping the rows of the layer's own parameters with one entry per
    output channel (`_extra_rows`: timm's weight-standardised ScaledStdConv2d `gain`, NFNets)."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        removed, extras = {int(i) for i in idxs}, _extra_rows(layer)
        keep = [i for i in range(layer.out_channels) if i not in removed]
        layer = super().prune_out_channels(layer, idxs)
        for name in extras:
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
        return layer


class Graph(tp.DependencyGraph):
    """Torch-Pruning's DependencyGraph with prunelab's pruners, index mappings and bounded walk, in this instance only.

    Grouped convolutions whose outputs follow their inputs (`grouped_unit` > 1) go to `GroupedConvPruner`:
    Torch-Pruning's
    own ConvPruner keeps `groups` and slices grouped weights as if every group lost the same channels, which leaves
    ResNeXt's convolutions invalid. Its customized pruners are chosen by module type alone, so the choice per
    convolution is made where the graph looks a pruner up, and the two predicates that tell in- from out-channel
    pruning learn its function. Norms go to `BatchNormPruner`, `GroupNormPruner` and `InstanceNormPruner` through this
    graph's own pruner table.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grouped_conv_pruner = GroupedConvPruner()
        self.extras_conv_pruner = ExtrasConvPruner()
        self.norm_weight_pruner = NormWeightPruner()
        self.unmapped: dict[nn.Module, str] = {}
        self.walk_limit = WALK_MIN_INDICES
        self.mapped = False  # inside `reading`: the index mappings are done
        # This graph's copy of Torch-Pruning's pruner table, and the functions it tells in- and out-channel pruning by.
        own = {ops.OPTYPE.BN: BatchNormPruner(), ops.OPTYPE.GN: GroupNormPruner(), ops.OPTYPE.IN: InstanceNormPruner()}
        self.REGISTERED_PRUNERS.update(own)
        pruners = [p for p in (*self.REGISTERED_PRUNERS.values(), *self.CUSTOMIZED_PRUNERS.values()) if p is not None]
        self._in_channel_pruning_fn = {p.prune_in_channels for p in pruners}
        self._out_channel_pruning_fn = {p.prune_out_channels for p in pruners}

    def build_dependency(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Any = None,
        output_transform: Any = None,
        unwrapped_parameters: Any = None,
        customized_pruners: dict | None = None,
        ignored_layers: list | None = None,
        ignored_params: list | None = None,
        verbose: bool = True,
    ) -> Graph:
        """Torch-Pruning's build from its steps (trace, dependencies, shape information), with prunelab's index mapping
        (`map_indices`) in place of Torch-Pruning's; the shapes of every view and reshape, the attributes holding the
        sizes of equal splits and slice bounds, and concatenations' part sizes are recorded while it traces
        (`_ReshapeRecorder`); `rms_norm_like` norms go to `NormWeightPruner`."""
        self.reshapes: dict[Any, tuple[torch.Size, torch.Size]] = {}
        self.splits: dict[Any, tuple[str, str, int]] = {}
        self.sections: dict[Any, tuple[str, str | list[str]]] = {}
        self.slices: dict[Any, tuple[str, str, str]] = {}
        self.cats: dict[Any, list[int]] = {}
        recorder = _ReshapeRecorder(self.reshapes, self.splits, self.sections, self.slices, self.cats, model)
        self.walk_limit = walk_limit(model)
        self.last_dim_splits: set[Any] = set()  # splits of channels last (`_splits_channels_dim`), mapped as channels
        norms = {type(m): self.norm_weight_pruner for m in model.modules() if rms_norm_like(m)}
        customized = {**norms, **(customized_pruners or {})}
        if not torch.is_grad_enabled():
            raise RuntimeError("building a dependency graph traces autograd: gradients must be enabled")
        with recorder, warnings.catch_warnings():
            # Parameters no layer holds (position biases, layer scales) are mapped here and checked by `check_prunable`:
            # Torch-Pruning's advice to pass them as `unwrapped_parameters` is not for prunelab's users.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            self.verbose, self.model = verbose, model
            self._module2name = {module: name for name, module in model.named_modules()}
            for kind, pruner in customized.items():
                self.register_customized_layer(kind, pruner)
            self.IGNORED_LAYERS_IN_TRACING.extend(ignored_layers or [])
            self.ignored_params = ignored_params if ignored_params is not None else []
            # A customized layer's pruner handles the layer whole: its submodules are not traced.
            for module in model.modules():
                if any(
                    module is kind or (not isinstance(kind, nn.Module) and isinstance(module, kind))
                    for kind in self.CUSTOMIZED_PRUNERS
                ):
                    self.IGNORED_LAYERS_IN_TRACING.extend(m for m in module.modules() if m is not module)
            self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(unwrapped_parameters)
            self.module2node = self._trace(model, example_inputs, forward_fn, output_transform=output_transform)
            self._build_dependency(self.module2node)
            shape_infer.init_shape_information(self)
            self.map_indices()
        if not self.reshapes.get("tokens"):
            # A parameter added to channels-first maps (Visformer's position embeddings, (1, C, H, W)) loses channels
            # along dim 1; Torch-Pruning's default for a parameter no layer holds is its last dimension that is not 1.
            for key, node in self.module2node.items():
                if isinstance(key, nn.Parameter) and key.dim() == 4 and key.shape[0] == 1 and key.shape[1] > 1:
                    node.pruning_dim = 1
        return self

    # ---- index mapping: Torch-Pruning's per-operation mappings, guarded and corrected -------------------------------

    def map_indices(self) -> None:
        """Give every dependency through a concatenation, split, reshape, unbind, expansion or slice its index mapping.

        Torch-Pruning's own pass (`index_mapping.update_index_mapping`), which it redoes for every group it is asked
        for, with prunelab's corrections: reshapes whose channel mapping Torch-Pruning cannot work out (a channel
        shuffle: a view that splits channels into groups, a transpose, a view back, which makes its reshape mapping
        divide by zero) are recorded in `unmapped` with the reason, not raised, and the channels through them are kept
        whole (`groups_from_graph`); splits and concatenations are mapped by the chunks autograd says each output reads.
        """
        own = {
            ops.OPTYPE.CONCAT: self._map_concat,
            ops.OPTYPE.SPLIT: self._map_split,
            ops.OPTYPE.RESHAPE: self._map_reshape,
            ops.OPTYPE.UNBIND: lambda node: index_mapping.update_unbind_index_mapping(self, node),
            ops.OPTYPE.EXPAND: self._map_expand,
            ops.OPTYPE.SLICE: self._map_slice,
        }
        for node in self.module2node.values():
            if node.type in own:
                own[node.type](node)

    def _map_reshape(self, node: Any) -> None:
        if self.reshapes.get("tokens"):
            # Channels last (Swin's 4-D windows included): reshapes keep the channel dimension, as
            # Torch-Pruning assumes for 3-D tokens; its flatten mappings would expand every index.
            return
        shapes = self.reshapes.get(node.grad_fn)
        if node.grad_fn in self.reshapes.get("parameters", ()):
            # A layer's weight reshaped to compute the weight it applies (NFNets' standardised convolutions):
            # no activation's channels pass there, so a group's walk ends.
            for dep in node.dependencies:
                dep.index_mapping = [_no_channels, None]
            return
        if shapes is None and _beside_matmul(node):
            # A view autograd makes inside a batched matrix product (attention on 4-D maps): Torch-Pruning
            # maps it as a flatten, and round the product's cycle the indices multiply without end.
            self.stop(node, "a reshape inside a matrix product")
            return
        if shapes is not None and _splits_channels(*shapes):
            self.stop(node, f"a reshape from {list(shapes[0])} to {list(shapes[1])} splits or merges channels")
            return
        try:
            index_mapping.update_reshape_index_mapping(self, node)
        except (ArithmeticError, IndexError, ValueError, RuntimeError) as err:
            self.stop(node, f"{type(err).__name__} in Torch-Pruning's index mapping of {_op_kind(node)}")

    def _map_split(self, node: Any) -> None:
        # Torch-Pruning gives a split's chunks to its outputs by position in the order it traced them,
        # one output per chunk; but outputs come in any order (MixNet's mixed convolutions read them
        # swapped) and a chunk may have several readers (CSP's half feeding a residual block). Autograd
        # knows which chunk each reads.
        channels_last = bool(self.reshapes.get("tokens")) and _saved_dim(node.grad_fn) != 1
        if not _splits_channels_dim(node.grad_fn, channels_last):
            return index_mapping.update_split_index_mapping(
                self, node
            )  # not split along channels: Torch-Pruning leaves it unmapped
        chunk: dict[Any, int] = {}
        for out in node.outputs:
            read = self._chunks_read(out, node)
            if len(read) != 1:
                self.stop(node, f"{node.name}: an output reads {len(read) or 'none'} of its chunks")
                return
            chunk[out] = read.pop()
        node.outputs.sort(key=chunk.get)
        # The chunk sizes as they are now: those traced go stale once a group is removed. Equal chunks
        # stay equal (`x.split(k)`, `x.chunk(n)`); others are read off the layers reading them.
        traced = _chunk_sizes(node.grad_fn) or node.module.split_sizes
        total = shape_infer.infer_out_channels_recursively(self, node.inputs[0], [0]) if len(node.inputs) == 1 else None
        if not traced or not total:
            return index_mapping.update_split_index_mapping(self, node)
        if channels_last:
            # The last dimension holds the channels only where it is as wide as the layer's output: MaxViT's
            # chunk of a view to (B, N, heads, 3 x head_dim) cuts a head's width, not the channels.
            if node.grad_fn._saved_self_sym_sizes[-1] != total:
                return index_mapping.update_split_index_mapping(self, node)
            self.last_dim_splits.add(node.grad_fn)
        if _equal_split(node.grad_fn, channels_last) and len(set(traced)) == 1 and total % len(traced) == 0:
            sizes = [total // len(traced)] * len(traced)
        else:
            read = {
                chunk[out]: self.get_in_channels(out) for out in reversed(node.outputs) if self.get_in_channels(out)
            }
            sizes = [read.get(i) for i in range(len(traced))]
            if sizes.count(None) == 1:  # one section read by no layer (passed on to a concatenation): the rest
                sizes[sizes.index(None)] = total - sum(n for n in sizes if n is not None)
            if None in sizes or sum(sizes) != total:
                # Sections the layers do not tell (MambaOut's gate and value read by products): the sizes
                # Torch-Pruning's split pruner left from an earlier removal, else the traced ones.
                now = node.module.split_sizes or []
                by_chunk = dict(zip((chunk[out] for out in node.outputs), now)) if len(now) == len(node.outputs) else {}
                sizes = [by_chunk.get(i) for i in range(len(traced))]
            sizes = sizes if None not in sizes and sum(sizes) == total else list(traced)
        # Torch-Pruning reads split_sizes by output (one per reader); the offsets here are by chunk.
        node.module.split_sizes = [sizes[chunk[out]] for out in node.outputs]
        node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        index_mapping.update_split_index_mapping(self, node)
        offsets = node.module.offsets
        for out, nr in chunk.items():
            for dep, reverse in [*((d, False) for d in node.dependencies), *((d, True) for d in out.dependencies)]:
                # Channels last, Torch-Pruning maps none of them (it maps splits of dim 1 only).
                mapped = isinstance(dep.index_mapping[0], _SplitIndexMapping) or channels_last
                if dep.target is (node if reverse else out) and mapped:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[nr : nr + 2], reverse=reverse)
            if out.type == ops.OPTYPE.CONCAT:
                self._cat_reads_split(out, node, nr)

    def _chunks_read(self, out: Any, split: Any) -> set[int]:
        """The chunks of a split that a node reads. A layer's node is its output's autograd node
        (BatchNormAct's activation): the split is looked for a few steps back, short of other nodes."""
        if not hasattr(self, "traced_fns"):
            self.traced_fns = {n.grad_fn for n in self.module2node.values()}
        read, todo = set(), [(out.grad_fn, 0)]
        while todo:
            fn, depth = todo.pop()
            for before, nr in getattr(fn, "next_functions", None) or ():
                if before is split.grad_fn:
                    read.add(nr)
                elif before is not None and before not in self.traced_fns and depth < 4:
                    todo.append((before, depth + 1))
        return read

    def _cat_reads_split(self, cat: Any, split: Any, nr: int) -> None:
        # From a concatenation back to a split chunk it reads, the concatenation's part is cut out before
        # the chunk's offset is added: Torch-Pruning applies the two in the other order (Res2Net's last chunk).
        if cat.module.offsets is None or split.module.offsets is None or split not in cat.inputs:
            return
        i = cat.inputs.index(split)
        for dep in cat.dependencies:
            if dep.target is split:
                dep.index_mapping = [
                    index_mapping._ConcatIndexMapping(offset=cat.module.offsets[i : i + 2], reverse=True),
                    _SplitIndexMapping(offset=split.module.offsets[nr : nr + 2], reverse=True),
                ]

    def _map_expand(self, node: Any) -> None:
        if _beside_matmul(node):
            self.stop(node, "an expansion inside a matrix product")
            return
        index_mapping.update_expand_index_mapping(self, node)

    def _map_slice(self, node: Any) -> None:
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        if self.reshapes.get("tokens") and sizes is not None and _saved_dim(node.grad_fn) != len(sizes) - 1:
            return  # channels last: a slice of another dimension (LeViT's subsampled tokens) keeps every channel
        index_mapping.update_slice_index_mapping(self, node)

    def _map_concat(self, node: Any) -> None:
        # The sizes of its parts as traced, in the order of its arguments: Torch-Pruning infers them from the
        # layers before, which a slice hides (ReXNet's cat([x[:, :c] + shortcut, x[:, c:]])).
        position = {fn: i for i, (fn, _) in enumerate(getattr(node.grad_fn, "next_functions", None) or ())}
        traced = self.cats.get(node.grad_fn)
        at = [position.get(n.grad_fn) for n in node.inputs]
        if node.module.concat_sizes is None and traced and None not in at and sorted(at) == list(range(len(traced))):
            node.inputs.sort(key=lambda n: position[n.grad_fn])
            node.module.concat_sizes = list(traced)
        for split in node.inputs:
            if split.type == ops.OPTYPE.SPLIT:  # its chunk sizes first (Torch-Pruning's own guess is a reader's width)
                self._map_split(split)
        try:
            index_mapping.update_concat_index_mapping(self, node)
        except (ArithmeticError, IndexError, ValueError, RuntimeError) as err:  # its shape inference (Gemma 4's ViT)
            self.stop(node, f"{type(err).__name__} in Torch-Pruning's index mapping of {_op_kind(node)}")
            return
        for split in node.inputs:
            if (
                split.type == ops.OPTYPE.SPLIT
                and split.module not in self.unmapped
                and len(read := self._chunks_read(node, split)) == 1
            ):
                self._cat_reads_split(node, split, read.pop())

    def stop(self, node: Any, reason: str) -> None:
        """Record a node whose channel mapping is unknown (`unmapped`: groups through it are kept whole) and end
        every group's walk there: past it, Torch-Pruning's guesses (flatten mappings round an attention's
        products) can multiply the indices without end (timm's BoTNet ran out of memory)."""
        self.unmapped[node.module] = reason
        for dep in node.dependencies:
            dep.index_mapping = [_no_channels, None]

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Read many groups without changing the model: the index mapping, which Torch-Pruning redoes
        over the whole graph for every group it is asked for, is done once."""
        self.map_indices()
        before, self.mapped = self.mapped, True
        try:
            yield
        finally:
            self.mapped = before

    # ---- groups -----------------------------------------------------------------------------------------------------

    def get_pruning_group(self, module: nn.Module, pruning_fn: Any, idxs: Any) -> Group:
        """Torch-Pruning's group of the layers coupled to removing `idxs` of `module` by `pruning_fn`, found by walking
        this graph's dependencies with prunelab's index mappings (`map_indices`, done first unless `reading`), bounded
        (`BoundedGroup`). Each item holds the target's own indices and, as `root_idxs`, the root's indices they
        follow."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
            pruning_fn = (
                function.prune_depthwise_conv_out_channels
            )  # as Torch-Pruning: a depthwise root prunes both sides
        if isinstance(idxs, Number):
            idxs = [idxs]
        if not self.mapped:
            self.map_indices()
        walk = BoundedGroup(self.walk_limit)
        root = self.module2node[module]
        walk.add_dep(
            Dependency(pruning_fn, pruning_fn, source=root, target=root),
            [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs],
        )
        self._walk(walk)
        group = Group()
        for dep, found in walk.items:
            target = dep.target.module
            if isinstance(target, nn.Parameter) and any(target is p for p in self.ignored_params):
                continue
            group.add_and_merge(dep, found)
        group._DG = self
        for i, (dep, found) in enumerate(group.items):
            group[i] = _helpers.GroupItem(dep, _helpers.to_plain_idxs(found))
            group[i].root_idxs = _helpers.to_root_idxs(found)
        return group

    def _walk(self, group: BoundedGroup) -> None:
        """Follow the group's root through every dependency its pruning function triggers, depth first, adding each
        target with the indices carried there; a node already reached with the same function and indices ends a path."""
        reached: set[Any] = set()
        pending = [tuple(group[0])]
        while pending:
            dep, idxs = pending.pop()
            reached.add(dep.target)
            for step in dep.target.dependencies:
                if not step.is_triggered_by(dep.handler):
                    continue
                carried = group.carry(step, idxs)
                if not carried or (step.target in reached and group.has_pruning_op(step, carried)):
                    continue
                group.add_dep(step, carried)
                pending.append((step, carried))

    def get_pruner_of_module(self, module: nn.Module) -> Any:
        if (grouped_unit(module) or 1) > 1:
            return self.grouped_conv_pruner
        if isinstance(module, nn.Conv2d) and module.groups == 1 and _extra_rows(module):
            return self.extras_conv_pruner
        return super().get_pruner_of_module(module)

    def is_out_channel_pruning_fn(self, fn: Any) -> bool:
        own = (self.grouped_conv_pruner.prune_out_channels, self.extras_conv_pruner.prune_out_channels)
        return fn in own or super().is_out_channel_pruning_fn(fn)

    def is_in_channel_pruning_fn(self, fn: Any) -> bool:
        own = (self.grouped_conv_pruner.prune_in_channels, self.extras_conv_pruner.prune_in_channels)
        return fn in own or super().is_in_channel_pruning_fn(fn)
