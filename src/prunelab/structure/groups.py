"""Channel groups: the sets of output channels that must be removed together.

A channel produced by one convolution is read by the next layer, normalised by a BatchNorm, maybe added
to a residual stream or concatenated with other feature maps. Torch-Pruning's DependencyGraph follows all
of this; a `ChannelGroup` is the plain, picklable summary of one of its groups that pruning methods score
and that a `ChannelPlan` refers to by name.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

log = logging.getLogger("prunelab")

# The one definition of a prunable layer: its output channels form groups (and count in
# `layer_index`), and its weight is what unstructured methods mask.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass
class ChannelGroup:
    """One prunable set of channels, named after its root layer.

    `name` is the qualified name of the first conv/linear layer (in module order) whose output
    channels are the group's; `layers` lists every conv/linear layer producing these channels, root
    first (depthwise and other grouped convolutions fed by the group are included, as their outputs
    are the same channels, group by group); `stage` counts the model's top-level children that hold a
    conv/linear layer, and `layer_index` counts all conv/linear layers in module order. `coupled`
    marks residual streams: more than one layer other than a grouped convolution writes these
    channels. `norms` names the BatchNorm layers that normalise these channels (what Network Slimming
    scores). `unit` is the number of channels removed together: 1, or for channels that pass through
    a grouped convolution (ResNeXt's), a block of consecutive channels holding whole groups of it, so
    a plan keeps or removes channels `unit * j` to `unit * (j + 1) - 1` together. `consumers` names
    the conv/linear layers that read the channels as their input channels (grouped convolutions the
    channels pass through are producers, not consumers). `merges` names the element-wise operations
    that combine these channels with other tensors, as autograd names them (e.g. "AddBackward0" for a
    residual addition, "MulBackward0" for a squeeze-excitation gate). `reads` gives, for a consumer
    that does not read each channel exactly once (a Linear after a flatten reads every channel once
    per pixel; a layer after a split reads only some), how many of its input channels come from each
    of the group's channels; a consumer not named there reads each channel once. `rows` gives, for a
    producing layer or a norm whose channels are not the group's one to one (a depthwise convolution
    or a BatchNorm after a concatenation holds several groups' channels), its channels for each of the
    group's channels: none where it does not hold it (one half of a concatenation), several where a
    concatenation holds it more than once (GhostNet's [x, cheap(x)]). `multiple`:
    the group keeps a multiple of this many channels (the heads of a MultiheadAttention it feeds,
    which splits its width evenly among them). `embedding` marks a transformer's embedding width: a
    residual stream through LayerNorms in a model with attention. `heads` names the attention module
    when the group is its heads (`attention_heads`): channel i is row i of its query, key and value
    projections each and column i of its output projection, and `unit` is the head dimension (whole
    heads), or 1 when the model's record asks for `prune_head_dim`. `blocks`: the group's channels form
    this many equal consecutive blocks that keep equal counts, each its own best channels (every head
    keeps the same head dimension; every chunk of a split into equal chunks, `x.split(k)` or
    `x.chunk(n)`, keeps the same size). `split_sizes` lists [module, attribute, chunks] for a module
    attribute that holds the size of such a split (CSP's `expand_chs`, the whole width: chunks 1;
    Res2Net's `width`, one chunk's: chunks = their count), which surgery sets to kept / chunks. `tied` lists
    blocks whose channel p goes with the others' channel p, so they keep the same positions (a residual stream meeting
    a ghost module's cheap copy; the halves of a gated MLP's `chunk(2)` multiplied together; Res2NeXt's chunks added
    through grouped convolutions, all but the last, which passes on alone).
    """

    name: str
    size: int
    layers: list[str] = field(default_factory=list)
    stage: int = 0
    layer_index: int = 0
    coupled: bool = False
    norms: list[str] = field(default_factory=list)
    unit: int = 1
    consumers: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    reads: dict[str, list[int]] = field(default_factory=dict)
    rows: dict[str, list[list[int]]] = field(default_factory=dict)
    multiple: int = 1
    embedding: bool = False
    heads: str | None = None
    blocks: int = 1
    split_sizes: list[list] = field(default_factory=list)
    tied: list[int] = field(default_factory=list)


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


class _ReshapeRecorder(torch.overrides.TorchFunctionMode):
    """Records (input shape, output shape) of every view and reshape, by the autograd node of its output,
    under "tokens" whether a linear layer saw more than flat features (channels last), and for a split
    into equal chunks of a size given as a number (`x.split(k)`) the attribute of the module making it
    that holds k or the whole width (`splits`: autograd node -> (module name, attribute, chunks per unit
    of the attribute)), which surgery updates (CSP's `expand_chs`, Res2Net's `width`); for a split into sections of
    listed sizes (`x.split([a, b])`), the module attribute holding the list or one attribute per section (`sections`:
    autograd node -> (module name, attribute or attributes): InceptionNeXt's `split_indexes`, FasterNet's
    `dim_conv3` and `dim_untouched`); likewise the attribute that bounds a slice of the channels (`slices`: autograd node -> (module name, attribute, "start" or "end"), and
    the sizes of a concatenation's parts (`cats`: autograd node -> sizes along its dimension)."""

    def __init__(self, shapes: dict, splits: dict, sections: dict, slices: dict, cats: dict, model: nn.Module) -> None:
        super().__init__()
        self.shapes, self.splits, self.sections, self.slices, self.cats = shapes, splits, sections, slices, cats
        self.names = {m: name for name, m in model.named_modules()}
        self.running: list[nn.Module] = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def end(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            self.running.pop()

        self.hooks = [register_module_forward_pre_hook(lambda m, _inputs: self.running.append(m)), register_module_forward_hook(end)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self.shapes[out.grad_fn] = (args[0].shape, out.shape)
            if self.running and isinstance(self.running[-1], nn.modules.conv._ConvNd):
                # A reshape inside a convolution's own forward: the convolution computing the weight it applies from
                # its own (weight standardisation: to (1, out, -1) and back with reshape_as).
                self.shapes.setdefault("parameters", set()).add(out.grad_fn)
        elif func is torch.nn.functional.linear and args[0].dim() > 2:
            self.shapes["tokens"] = True
        elif func in _SPLITS and isinstance(out, tuple) and out and out[0].grad_fn is not None and self.running:
            size = args[1] if len(args) > 1 else (kwargs or {}).get("split_size", (kwargs or {}).get("split_size_or_sections"))
            owner = self.running[-1]
            found = _int_attribute(owner, (size, size * len(out))) if type(size) is int and owner in self.names else None
            if found is not None:
                self.splits[out[0].grad_fn] = (self.names[owner], found[0], len(out) if found[1] == size else 1)
            held = _sections_attribute(owner, list(size)) if isinstance(size, (list, tuple)) and owner in self.names else None
            if held is not None:
                self.sections[out[0].grad_fn] = (self.names[owner], held)
        elif func is torch.cat and isinstance(out, torch.Tensor) and out.grad_fn is not None and out.dim() > 1:
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            self.cats[out.grad_fn] = [int(t.shape[dim]) for t in args[0]]
        elif func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor) and out.grad_fn is not None and self.running:
            index = args[1] if len(args) > 1 else None
            # Channels first: a slice of dim 1 of a batch of maps or vectors (3-D tensors are tokens, channels last).
            cut = index[1] if isinstance(index, tuple) and len(index) > 1 and isinstance(index[1], slice) and args[0].dim() in (2, 4) else None
            owner = self.running[-1]
            found = _int_attribute(owner, (cut.start, cut.stop)) if cut is not None and owner in self.names else None
            if found is not None:
                self.slices[out.grad_fn] = (self.names[owner], found[0], "end" if found[1] == cut.stop else "start")
        return out


def _int_attribute(module: nn.Module, values: tuple) -> tuple[str, int] | None:
    """The first public positive int attribute of a module holding one of `values`, as (name, value)."""
    for key, value in vars(module).items():
        if not key.startswith("_") and type(value) is int and value > 0 and value in values:
            return key, value
    return None


def _sections_attribute(module: nn.Module, sizes: list) -> str | list[str] | None:
    """The public attribute of a module holding a split's section sizes (a list or tuple of ints equal to them), else
    one int attribute per section where the sizes differ and each is held by exactly one, else None."""
    public = {key: value for key, value in vars(module).items() if not key.startswith("_")}
    for key, value in public.items():
        if isinstance(value, (list, tuple)) and list(value) == sizes and all(type(v) is int for v in value):
            return key
    holders = [[key for key, value in public.items() if type(value) is int and value == size] for size in sizes]
    if len(set(sizes)) == len(sizes) and all(len(keys) == 1 for keys in holders):
        return [keys[0] for keys in holders]
    return None


_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.reshape_as, torch.Tensor.view_as}
_SPLITS = {torch.Tensor.split, torch.split}


def _splits_channels(before: torch.Size, after: torch.Size) -> bool:
    """Whether a reshape of a channels-first batch splits the channel dimension (dim 1) into several or
    merges it with another, other than flattening everything after the batch or undoing such a
    flatten: a channel shuffle's view to (batch, groups, channels / groups, ...) or back, which
    Torch-Pruning maps wrongly. Only asked of models whose Linear layers see flat features (a model
    with tokens, channels last, is left to Torch-Pruning)."""
    if len(before) < 2 or len(after) < 2 or before[1] == after[1]:
        return False
    flatten = len(after) == 2 and after[1] == math.prod(before[1:])
    unflatten = len(before) == 2 and before[1] == math.prod(after[1:]) and after[1] > 1  # not channels made positions
    return not (flatten or unflatten)


def _saved_dim(fn: Any) -> int:
    """The dimension an autograd node saved (1 where it saved none), as a non-negative index where it knows its input's
    rank: autograd keeps a negative dimension as an unsigned 64-bit number (dim=-1: 2**64 - 1)."""
    dim, sizes = int(getattr(fn, "_saved_dim", 1)), getattr(fn, "_saved_self_sym_sizes", None)
    dim = dim - 2**64 if dim >= 2**63 else dim
    return dim % len(sizes) if sizes else dim


def _splits_channels_dim(split: Any, channels_last: bool) -> bool:
    """Whether a split's autograd node cuts the channel dimension: dim 1, or the last one where channels are last (a
    gated MLP's `x.chunk(2, dim=-1)` on tokens, which Torch-Pruning leaves unmapped)."""
    sizes = getattr(split, "_saved_self_sym_sizes", None)
    return _saved_dim(split) == 1 or (channels_last and sizes is not None and _saved_dim(split) == len(sizes) - 1)


def _equal_split(split: Any, channels_last: bool = False) -> bool:
    """Whether an autograd node is a split of the channels into chunks of one size (`x.split(k)`, `x.chunk(n)`):
    a split whose chunks must stay equal as channels go (one with a list of sizes can be given new sizes)."""
    return type(split).__name__ == "SplitBackward0" and _splits_channels_dim(split, channels_last)


def resize_splits(model: nn.Module, group: ChannelGroup, kept: int) -> None:
    """Give the module attributes that hold the size of an equal split of the group (`split_sizes`) the kept size."""
    for module, attribute, chunks in group.split_sizes:
        setattr(model.get_submodule(module), attribute, kept // chunks)


def resize_slices(model: nn.Module, graph: Any) -> None:
    """Give the module attributes that bound a slice of the channels (`x[:, :self.in_channels]`, ReXNet's partial
    residual) the bound Torch-Pruning's slice now has, after channels were removed; likewise those holding the section
    sizes of a split (`graph.sections`), where each section has one reader."""
    for node in graph.module2node.values():
        held = graph.sections.get(node.grad_fn)
        sizes = getattr(node.module, "split_sizes", None)
        if held is not None and sizes is not None and len(sizes) == len(_chunk_sizes(node.grad_fn) or ()):
            owner, attribute = model.get_submodule(held[0]), held[1]
            if isinstance(attribute, str):
                setattr(owner, attribute, type(getattr(owner, attribute))(int(n) for n in sizes))
            else:
                for key, n in zip(attribute, sizes):
                    setattr(owner, key, int(n))
        found = graph.slices.get(node.grad_fn)
        if found is not None and isinstance(getattr(node.module, found[2], None), int):  # a slice Torch-Pruning follows
            module, attribute, bound = found
            setattr(model.get_submodule(module), attribute, int(getattr(node.module, bound)))


def _chunk_sizes(split: Any) -> list[int] | None:
    """The sizes of the chunks a split's autograd node cut, as traced (Torch-Pruning records one per reader)."""
    if hasattr(split, "_saved_split_sizes"):
        return [int(k) for k in split._saved_split_sizes]
    dims = getattr(split, "_saved_self_sym_sizes", None)
    if hasattr(split, "_saved_split_size") and dims:
        size, k = int(dims[_saved_dim(split)]), int(split._saved_split_size)
        return [min(k, size - i) for i in range(0, size, k)]
    return None


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Any, nn.Module | None]:
    """Trace the model into a Torch-Pruning DependencyGraph, with the classifier's outputs protected."""
    from prunelab.backbones import customized_pruners

    # Imported here because masks -> plans -> groups would otherwise be a circular import.
    from prunelab.structure.masks import has_masks

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
        graph = Graph().build_dependency(
            model, example_inputs=example, customized_pruners=customized_pruners()
        )
    _drop_traced_caches(model)
    return graph, classifier


def _drop_traced_caches(model: nn.Module) -> None:
    """Forget tensors the traced forward pass left in modules' caches (timm's LeViT keeps attention biases
    per device in eval mode): made with gradients on, they would stop the model from being deep-copied."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())
            elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) and v.grad_fn is not None for v in value.values()):
                value.clear()


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


def _unit_of(group: Any, size: int) -> tuple[int, nn.Module | None]:
    """The channels a full pruning group removes together, and a grouped convolution that prevents it.

    Every grouped convolution the channels pass through asks for whole groups of its channels, so the
    unit is the least common multiple of their channels per group, counted in the root layer's
    channel order. Each convolution group must then lie inside one unit of the root's channels (a
    concatenation or a split on the way may shift or cut it); the first convolution for which that
    fails is returned, else None.
    """
    convs = [(item, k) for item in group if (k := grouped_unit(item.dep.target.module) or _norm_group(item.dep.target.module)) > 1]
    unit = math.lcm(*(k for _, k in convs))
    for item, k in convs:
        blocks: dict[int, list[int]] = {}
        for index, root in zip(item.idxs, item.root_idxs):
            blocks.setdefault(index // k, []).append(root)
        whole = all(len(roots) == k and len({r // unit for r in roots}) == 1 for roots in blocks.values())
        if size % unit or not whole:
            return unit, item.dep.target.module
    return unit, None


def rms_norm_like(module: nn.Module) -> bool:
    """A norm over the last or channel dimension with a `normalized_shape` and a per-channel `weight` that subclasses
    no norm Torch-Pruning knows: torch's RMSNorm, timm's RmsNorm / RmsNorm2d / SimpleNorm families (told by class name)."""
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
    return any(name == p or name.startswith(f"{p}.") or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}.*") for p in patterns)


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
    attention = any(isinstance(m, nn.MultiheadAttention) or isinstance(getattr(m, "num_heads", None), int) for m in model.modules())
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
            _log_once(f"the heads of {name!r} are kept whole: its projection {projections[0]!r} is not called as a module")
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
                # A root kept whole anyway (`keep_whole`, said at creation; `structure.skip`, the user's) needs no second reason.
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
                if node is not None and _equal_split(node.grad_fn, node.grad_fn in graph.last_dim_splits) and None not in item.root_idxs:
                    chunked.setdefault(node, set()).update(zip(map(int, item.idxs), map(int, item.root_idxs)))
                if isinstance(target, nn.modules.batchnorm._BatchNorm) and target in names and names[target] not in norms:
                    norms.append(names[target])
                    order = _order(item, size)
                    if order != identity or target.num_features != size:
                        rows[names[target]] = order
                if _unsupported_grouped(target):
                    # One that only writes the channels may lose the same count in each of its groups (equal blocks, below).
                    (writing if graph.is_out_channel_pruning_fn(dep.handler) and out_channels(target) == size else blocked).append(target)
                if isinstance(target, nn.MultiheadAttention):
                    multiple = math.lcm(multiple, target.num_heads)
                layer_norm = layer_norm or isinstance(target, nn.LayerNorm) or rms_norm_like(target)
                if type(target).__name__ == "_ElementWiseOp":
                    fn = getattr(target, "_grad_fn", None)
                    merges.add(fn if isinstance(fn, str) else type(fn).__name__)
                if any(root is None for root in item.root_idxs):  # the index mapping was lost on the way (e.g. through a reshape)
                    unmapped = unmapped or f"Torch-Pruning lost its channel indices on the way to {names.get(target, type(target).__name__)!r}"
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
                if len(set(chunks)) > 1 or not width or sorted(a for a, _ in pairs) != list(range(size)) or any(a % width != b % width for a, b in pairs):
                    unmapped = unmapped or f"they are split by {node.name} into chunks {chunks}, not equal ones that hold all of them"
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
                        f"channel group {name!r} is kept whole: some of its channels are copies of others (a depthwise copy "
                        f"concatenated with its input, as in GhostNet's ghost modules) at positions that do not line up "
                        f"block by block, so they cannot be removed one by one"
                    )
                    continue
            if unmapped is None and crossed and len(tied) != blocks:
                unmapped = "a split's chunks are mapped onto each other's channels, and not every chunk is tied to the others"
            for consumer, (fan_in, counts) in overread.items():
                # Tied blocks multiplied together (a gated MLP's halves) reach a reader's input once per block: counted once.
                width = size // max(blocks, len(tied))
                counts = [n * (c // width not in tied[1:]) for c, n in enumerate(counts)]
                if sum(counts) > fan_in:  # e.g. a token-mixing Linear (ResMLP, MLP-Mixer) reading the transposed stream
                    unmapped = unmapped or f"{consumer!r} would read {sum(counts)} of its {fan_in} inputs from them: it reads another axis"
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
                    f"the group norm {names.get(conv, type(conv).__name__)!r} ({conv.num_groups} groups of {conv.num_channels} channels)"
                    if isinstance(conv, nn.GroupNorm)
                    else f"the grouped convolution {names[conv]!r} (groups={conv.groups}, {conv.in_channels} -> {conv.out_channels} channels)"
                )
                _log_once(f"channel group {name!r} is kept whole: it passes through {what}, and {why}, so no whole group of it can be removed")
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
            listed = f"{kept[0]!r}, {kept[1]!r} and {len(kept) - 2} more" if len(kept) > 2 else f"{kept[0]!r} and {kept[1]!r}"
            _log_once(f"channel groups {listed} are kept whole: Torch-Pruning cannot follow their channels ({reason})")
    return groups


def _holds_part(rows: dict[str, list[list[int]]], names: dict) -> bool:
    """Whether a grouped layer holds only part of a group (a ghost module's cheap copy): its channels may be copies."""
    by_name = {name: m for m, name in names.items() if isinstance(m, nn.Module)}
    return any(grouped_unit(by_name.get(layer, nn.Identity())) and any(not r for r in held) for layer, held in rows.items())


def _tied_blocks(graph: Any, root: nn.Module, pruner: Any, size: int, blocks: int) -> list[int] | None:
    """The blocks of a group whose channel p goes with the others' channel p when it is removed (`ChannelGroup.tied`):
    none where each channel goes alone; else, of its `blocks` equal blocks (or, where it has none, of as many as
    channels go together), those holding the first channel's partners, at its position in each (a stream added to a
    ghost module's input and cheap copy; halves multiplied together; chunks added through grouped convolutions); None
    where they lie otherwise. Torch-Pruning's group of all channels hides it; the first and the last channel of the
    first block, walked alone, show it."""

    def partners(channel: int) -> set[int]:
        probe = graph.get_pruning_group(root, pruner.prune_out_channels, [channel])
        return {int(i) for item in probe if item.dep.target.module is root and graph.is_out_channel_pruning_fn(item.dep.handler) for i in item.idxs}

    first = partners(0)
    if len(first) == 1:
        return []
    blocks = blocks if blocks > 1 else len(first)
    width = size // blocks
    tied = sorted(c // width for c in first)
    if size % blocks or first != {b * width for b in tied} or partners(width - 1) != {b * width + width - 1 for b in tied}:
        return None
    return tied


def channels_written(group: ChannelGroup, layer: str) -> list[int] | None:
    """How many output channels of a producing `layer` each of the group's channels is (None: one each)."""
    if group.heads is not None and not group.rows:
        return [3] * group.size  # its query, key and value rows
    if layer in group.rows:
        return [len(r) for r in group.rows[layer]]
    return None


def _linear_of(module: nn.Module | None) -> nn.Module | None:
    """The Linear layer (or 1x1 convolution) of a projection: itself, LeViT's LinearNorm's or ConvNorm's `linear`,
    or a Sequential's last one's."""
    if isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1 and module.stride == (1, 1)
    ):
        return module
    if getattr(module, "linear", None) is not None:
        return _linear_of(module.linear)
    if isinstance(module, nn.Sequential) and len(module):
        return _linear_of(module[-1])
    return None


def _norm_of(module: nn.Module | None) -> nn.Module | None:
    """The BatchNorm that follows a projection's Linear layer inside it (LeViT's LinearNorm's `bn`), if any."""
    if isinstance(module, nn.Sequential) and len(module):
        return _norm_of(module[-1])
    norm = getattr(module, "bn", None)
    return norm if isinstance(norm, nn.modules.batchnorm._BatchNorm) else None


class Writer(NamedTuple):
    """A projection writing part of each head (`HeadLayout`): the slots `parts` = [(first slot, width), ...] it writes,
    head by head (`by_head`: head 0's parts, then head 1's) or part by part (all heads' first part, then the next
    part's), after `offset` rows of its own that belong to no head (kept whole)."""

    attr: str
    parts: list[tuple[int, int]]
    by_head: bool = False
    offset: int = 0


class HeadLayout(NamedTuple):
    """Where an attention whose heads are written by several projections (or laid out head by head) keeps a head's
    channels: a head has `per` slots in the order query, key, value (and any other per-head rows), written by
    `writers`; the output projection (attribute `proj`) reads the value slots `values` = (first slot, width)."""

    writers: list[Writer]
    per: int
    values: tuple[int, int]
    proj: str = "proj"


def head_layout(m: nn.Module) -> HeadLayout | None:
    """The `HeadLayout` of an attention module, or None for any other module (and for timm's stacked `qkv` layout,
    which `attention_heads` reads on its own). A module that says so itself (`head_layout()`: the timm attentions
    rebuilt at creation, backbones.attention), or one laying each head's query, key and value out together (timm's
    LeViT, EfficientFormer, TinyViT: `qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim], dim=3)`, or
    LeViT's downsampling attention with `q` and `kv`; key and value widths may differ)."""
    own = getattr(m, "head_layout", None)
    layout = own() if callable(own) else None
    heads, kd, vd = (getattr(m, n, None) for n in ("num_heads", "key_dim", "val_dim"))
    if layout is None and all(type(v) is int and v > 0 for v in (heads, kd, vd)):
        writers = [Writer("qkv", [(0, 2 * kd + vd)], True)] if hasattr(m, "qkv") else [Writer("q", [(0, kd)], True), Writer("kv", [(kd, kd + vd)], True)]
        layout = HeadLayout(writers, 2 * kd + vd, (2 * kd, vd))
    if layout is None or not isinstance(heads, int):
        return None
    linears = [_linear_of(getattr(m, w.attr, None)) for w in layout.writers]
    proj = _linear_of(getattr(m, layout.proj, None))
    if proj is None or any(l is None for l in linears) or _fan_in(proj) != heads * layout.values[1]:
        return None
    if any(out_channels(l) != w.offset + heads * sum(n for _, n in w.parts) for l, w in zip(linears, layout.writers)):
        return None
    return layout


def _fan_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _head_writers(model: nn.Module, attention: str) -> list[str]:
    """The names of the Linear layers that write an attention's heads (qkv; or q and kv)."""
    m = model.get_submodule(attention)
    prefix = f"{attention}." if attention else ""
    names = {id(module): name for name, module in m.named_modules()}
    layout = head_layout(m)
    return [prefix + names[id(_linear_of(getattr(m, w.attr)))] for w in layout.writers] if layout else [f"{prefix}qkv"]


def _head_reader(model: nn.Module, attention: str) -> str:
    """The name of the output projection that reads an attention's heads."""
    m = model.get_submodule(attention)
    layout = head_layout(m)
    prefix = f"{attention}." if attention else ""
    names = {id(module): name for name, module in m.named_modules()}
    return prefix + names[id(_linear_of(getattr(m, layout.proj)))] if layout else f"{prefix}proj"


def attention_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules whose heads can be pruned, by name: timm's layout (`qkv` and `proj`
    Linear layers, `num_heads` heads, query/key/value stacked in `qkv`'s rows; ViT's Attention, Swin's
    WindowAttention) with no layer over the joint head width (`norm` an Identity, no `gate`), and the
    layouts of `head_layout` (heads written by several projections, or each head's query, key and value together)."""
    found = {}
    for name, m in model.named_modules():
        if getattr(m, "keep_whole", False):  # backbones.attention.relayout: a bias shared with other blocks
            continue
        if head_layout(m):
            found[name] = m
            continue
        qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads >= 1):
            continue
        # A module that derives the head width from the embedding cannot lose heads apart from it: it must keep
        # `head_dim`, or be timm's Swin one (torchvision's are rebuilt so at creation: backbones.attention).
        if not (isinstance(getattr(m, "head_dim", None), int) or type(m).__name__ == "WindowAttention"):
            continue
        dim = head_dim(m)
        if qkv.out_features == 3 * heads * dim and proj.in_features == heads * dim:
            if isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) and getattr(m, "gate", None) is None:
                found[name] = m
    return found


def head_dim(attention: nn.Module) -> int:
    """Channels per head: the module's `head_dim`, else (Swin keeps none) qkv's rows over 3 x heads."""
    found = getattr(attention, "head_dim", None)
    return found if isinstance(found, int) else attention.qkv.out_features // (3 * attention.num_heads)


def head_dim_prunable(attention: nn.Module) -> bool:
    """Whether the heads' dimension can shrink: the module scales its queries by a `scale` it keeps (timm's
    Attention and WindowAttention) and normalises no query or key over the head dimension."""
    plain = all(isinstance(getattr(attention, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm"))
    # Heads read dimension by dimension (NesT) lose whole heads only: kept dimensions could differ from head to head.
    # MViTv2's pooling layers act on the head dimension shared by all heads (`head_dim_whole`).
    whole = getattr(attention, "proj_dim_major", False) or getattr(attention, "head_dim_whole", False)
    return plain and isinstance(getattr(attention, "scale", None), float) and not whole


def _head_group(model: nn.Module, attention: str, index_of: dict[str, int], stages: dict[str, int]) -> ChannelGroup:
    """The group of an attention module's heads (`ChannelGroup.heads`), named after its qkv layer: whole
    heads, or with the record's `prune_head_dim` (where `head_dim_prunable`) the same dimensions per head."""
    m = model.get_submodule(attention)
    if head_layout(m):
        return _layout_group(model, attention, index_of, stages)
    width = m.num_heads * head_dim(m)
    qkv = f"{attention}.qkv" if attention else "qkv"
    # Heads whose logits are mixed (`heads_mix`: CaiT's talking heads) cannot leave alone: they lose dimensions.
    asked = bool(getattr(model.__dict__.get("prunelab"), "prune_head_dim", False)) or getattr(m, "heads_mix", False)
    by_dim = asked and head_dim_prunable(m)
    return ChannelGroup(
        name=qkv,
        size=width,
        layers=[qkv],
        stage=stages.get(qkv, 0),
        layer_index=index_of[qkv],
        unit=1 if by_dim else head_dim(m),
        consumers=[f"{attention}.proj" if attention else "proj"],
        multiple=m.num_heads if by_dim else 1,
        heads=attention,
        blocks=m.num_heads if by_dim else 1,
    )


def _layout_group(model: nn.Module, attention: str, index_of: dict[str, int], stages: dict[str, int]) -> ChannelGroup:
    """The heads of an attention with a `head_layout`: channel c is slot c % per of head c // per, held by the
    projection writing that slot (`rows`, with its BatchNorm's), and the output projection reads the value slots
    (`reads`). Whole heads only (`unit`)."""
    m = model.get_submodule(attention)
    layout, heads = head_layout(m), m.num_heads
    per, (first_value, values) = layout.per, layout.values
    prefix = f"{attention}." if attention else ""
    names = {id(module): prefix + name for name, module in m.named_modules()}
    rows: dict[str, list[list[int]]] = {}
    for writer in layout.writers:
        held: list[list[int]] = [[] for _ in range(heads * per)]
        total, before = sum(w for _, w in writer.parts), 0
        for first, width in writer.parts:
            for h in range(heads):
                for j in range(width):
                    row = h * total + before + j if writer.by_head else before * heads + h * width + j
                    held[h * per + first + j] = [writer.offset + row]
            before += width
        rows[names[id(_linear_of(getattr(m, writer.attr)))]] = held
        norm = _norm_of(getattr(m, writer.attr))
        if norm is not None:
            rows[names[id(norm)]] = held
    layers = sorted((n for n in rows if isinstance(model.get_submodule(n), PRUNABLE_TYPES)), key=index_of.get)
    proj = names[id(_linear_of(getattr(m, layout.proj)))]
    return ChannelGroup(
        name=layers[0],
        size=heads * per,
        layers=layers,
        stage=stages.get(layers[0], 0),
        layer_index=index_of[layers[0]],
        norms=[n for n in rows if n not in layers],
        unit=per,
        consumers=[proj],
        reads={proj: [int(first_value <= c % per < first_value + values) for c in range(heads * per)]},
        rows=rows,
        heads=attention,
    )


def check_head_plan(model: nn.Module, group: ChannelGroup, kept: list[int]) -> int:
    """The head dimension a plan keeping `kept` of `group`'s channels leaves; ValueError where it is not one:
    every head the plan keeps must keep equally many channels, and fewer than all only where `head_dim_prunable`."""
    m = model.get_submodule(group.heads)
    dim = group.unit if group.rows else head_dim(m)
    per_head: dict[int, int] = {}
    for index in kept:
        per_head[index // dim] = per_head.get(index // dim, 0) + 1
    counts = sorted(set(per_head.values()))
    if len(counts) > 1:
        raise ValueError(
            f"the plan keeps {counts[0]} to {counts[-1]} channels per head of {group.heads!r}: every head it keeps "
            f"must keep the same number (heads of {dim} channels)"
        )
    if getattr(m, "heads_mix", False) and len(per_head) < m.num_heads:
        raise ValueError(
            f"the plan removes whole heads of {group.heads!r}, whose heads' logits are mixed: every head must keep "
            f"some of its {dim} channels"
        )
    kept_dim = counts[0] if counts else dim
    if kept_dim < dim and (group.rows or not head_dim_prunable(m)):
        raise ValueError(
            f"the plan splits a head of {group.heads!r}: heads of {dim} channels are kept or removed whole here "
            f"(its queries or keys are normalised over the head dimension, or it keeps no `scale`)"
        )
    return kept_dim


def prune_heads(model: nn.Module, group: ChannelGroup, kept: list[int]) -> None:
    """Keep the channels `kept` of the heads of `group.heads`: the rows of query, key and value, the
    columns of the output projection, the module's own per-head parameters (relative position bias tables,
    heads last; Swin V2's logit scales, heads first, and the rows of its position-bias MLP's last layer)
    and its head count. Where every kept head keeps fewer dimensions (d of D), the head dimension shrinks
    too: the query rows are multiplied by (d/D)^1/2 and `scale` by (D/d)^1/2 (so D^-1/2 becomes d^-1/2,
    what fused attention uses), so the logits of the kept dimensions stay what they were."""
    m = model.get_submodule(group.heads)
    if group.rows:
        return _prune_laid_out(model, group, kept)
    dim, heads = head_dim(m), m.num_heads
    kept_dim = check_head_plan(model, group, kept)
    index = torch.tensor(sorted(kept), dtype=torch.long, device=m.qkv.weight.device)
    rows = torch.cat([index + part * heads * dim for part in range(3)])
    kept_heads = index[::kept_dim] // dim
    factor = torch.ones(rows.numel(), device=rows.device)
    factor[: index.numel()] = (kept_dim / dim) ** 0.5  # the query rows come first
    with torch.no_grad():
        weight = m.qkv.weight[rows] * factor[:, None].to(m.qkv.weight.dtype)
        m.qkv.weight = nn.Parameter(weight, m.qkv.weight.requires_grad)
        if m.qkv.bias is not None:
            m.qkv.bias = nn.Parameter(m.qkv.bias[rows] * factor.to(m.qkv.bias.dtype), m.qkv.bias.requires_grad)
        # Columns of the kept channels: head by head, or dimension by dimension (NesT: column d x heads + h).
        columns = torch.sort(index % dim * heads + index // dim).values if getattr(m, "proj_dim_major", False) else index
        m.proj.weight = nn.Parameter(m.proj.weight[:, columns].clone(), m.proj.weight.requires_grad)
        for name, p in list(m.named_parameters(recurse=False)):
            if p.dim() and p.shape[-1] == heads:
                setattr(m, name, nn.Parameter(p[..., kept_heads].clone(), p.requires_grad))
            elif p.dim() and p.shape[0] == heads and p[0].numel() == 1:
                setattr(m, name, nn.Parameter(p[kept_heads].clone(), p.requires_grad))
        _prune_position_bias(m, heads, kept_heads)
    m.qkv.out_features, m.proj.in_features = rows.numel(), index.numel()
    m.num_heads = len(kept_heads)
    if kept_dim < dim:
        m.scale = kept_dim**-0.5 if math.isclose(m.scale, dim**-0.5) else m.scale * (dim / kept_dim) ** 0.5
        if isinstance(getattr(m, "head_dim", None), int):
            m.head_dim = kept_dim
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * kept_dim


def _prune_position_bias(m: nn.Module, heads: int, kept_heads: torch.Tensor) -> None:
    """Keep the heads `kept_heads` in an attention's position-bias modules (its children besides the projections and
    norms: Swin V2's `cpb_mlp`, timm's RelPosBias / RelPosMlp): the rows of a Linear layer with one output per head, a
    table's last dimension of heads, and the head count they record (`num_heads`, `bias_shape` ending in it)."""
    own = {id(getattr(m, n, None)) for n in ("qkv", "proj", "q_norm", "k_norm", "norm")}
    for child in [c for c in m.children() if id(c) not in own]:
        for sub in child.modules():
            if isinstance(sub, nn.Linear) and sub.out_features == heads:
                sub.weight = nn.Parameter(sub.weight[kept_heads].clone(), sub.weight.requires_grad)
                if sub.bias is not None:
                    sub.bias = nn.Parameter(sub.bias[kept_heads].clone(), sub.bias.requires_grad)
                sub.out_features = len(kept_heads)
            elif not isinstance(sub, nn.Linear):
                for name, p in list(sub.named_parameters(recurse=False)):
                    if p.dim() > 1 and p.shape[-1] == heads:
                        setattr(sub, name, nn.Parameter(p[..., kept_heads].clone(), p.requires_grad))
            if getattr(sub, "num_heads", None) == heads:
                sub.num_heads = len(kept_heads)
            shape = getattr(sub, "bias_shape", None)
            if isinstance(shape, tuple) and shape and shape[-1] == heads:
                sub.bias_shape = (*shape[:-1], len(kept_heads))


def _prune_laid_out(model: nn.Module, group: ChannelGroup, kept: list[int]) -> None:
    """Keep the whole heads `kept` holds of an attention with a `head_layout` (`_layout_group`): the rows of
    its projections and their BatchNorms, the value columns of its output projection, its per-head parameters
    (attention biases, heads first), its head count and joint widths; its cached attention biases are dropped."""
    m = model.get_submodule(group.heads)
    check_head_plan(model, group, kept)
    kept = sorted(kept)
    kept_heads = sorted({c // group.unit for c in kept})
    with torch.no_grad():
        for name, rows in group.rows.items():
            layer = model.get_submodule(name)
            # Rows in their order (a projection writing parts one after the other, kv, holds a head's rows apart), and
            # the rows of no head (`Writer.offset`).
            held = {r for held in rows for r in held}
            size = layer.num_features if isinstance(layer, nn.modules.batchnorm._BatchNorm) else out_channels(layer)
            index = sorted({r for c in kept for r in rows[c]} | set(range(size)) - held)
            index = torch.tensor(index, dtype=torch.long, device=layer.weight.device)
            for key in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(layer, key, None)
                if isinstance(tensor, nn.Parameter):
                    setattr(layer, key, nn.Parameter(tensor[index].clone(), tensor.requires_grad))
                elif tensor is not None:
                    setattr(layer, key, tensor[index].clone())  # a buffer stays one
            if isinstance(layer, nn.Linear):
                layer.out_features = index.numel()
            elif isinstance(layer, nn.Conv2d):
                layer.out_channels = index.numel()
            else:
                layer.num_features = index.numel()
        (proj_name, reads), = group.reads.items()
        proj = model.get_submodule(proj_name)
        column = {c: i for i, c in enumerate(c for c in range(group.size) if reads[c])}
        columns = torch.tensor([column[c] for c in kept if reads[c]], dtype=torch.long, device=proj.weight.device)
        proj.weight = nn.Parameter(proj.weight[:, columns].clone(), proj.weight.requires_grad)
        setattr(proj, "in_features" if isinstance(proj, nn.Linear) else "in_channels", columns.numel())
        for name, p in list(m.named_parameters(recurse=False)):
            if p.dim() and p.shape[0] == m.num_heads:
                setattr(m, name, nn.Parameter(p[kept_heads].clone(), p.requires_grad))
    # Its joint widths (LeViT's key_attn_dim and val_attn_dim, TinyViT's out_dim): heads times a head's width.
    widths = {m.num_heads * w: len(kept_heads) * w for w in (getattr(m, "key_dim", 0), getattr(m, "val_dim", 0)) if w}
    for key, value in list(vars(m).items()):
        if "dim" in key and type(value) is int and value in widths and key not in ("key_dim", "val_dim"):
            setattr(m, key, widths[value])
    m.num_heads = len(kept_heads)
    for key, value in vars(m).items():
        if not key.startswith("_") and isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            value.clear()


def channel_groups(model: nn.Module, input_shape: tuple[int, int, int]) -> list[ChannelGroup]:
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


def remember_groups(model: nn.Module, input_shape: tuple[int, int, int], path: Path, checked: bool = False) -> bool:
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
    from prunelab.io import write_json

    write_json(path, {"key": key, "checked": checked, "groups": [asdict(g) for g in groups]})
    return checked


def _signature(model: nn.Module) -> tuple:
    """Names and shapes of every parameter and buffer: what changes when channels are removed or masks attached."""
    return tuple((name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers()))


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"the model has no layer {name!r} (the group was found on another architecture)") from err


def root_weights(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """The root layer's weight, output channels first: what channel-scoring methods usually read."""
    return _module(model, group.name).weight


def group_weights(
    model: nn.Module, group: ChannelGroup, tensor: Callable[[nn.Module], torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The weights of every layer producing the group's channels (root first), one row per channel of the group.

    A layer that produces only some of the group's channels (`ChannelGroup.rows`) has zero rows for the
    others, and one that holds a channel k times (after a concatenation) its k rows joined along dim 1;
    an attention's heads give one row per channel holding its query, key and value rows.
    `tensor(layer)` picks another tensor with one row per output of the layer instead of its weight.
    """
    tensor = tensor or (lambda layer: layer.weight)
    if group.heads is not None and not group.rows:
        w = tensor(_module(model, group.name))
        return [w.view(3, group.size, -1).transpose(0, 1).reshape(group.size, -1)]
    weights = []
    for name in group.layers:
        w = tensor(_module(model, name))
        if name in group.rows:
            copies = max(1, *map(len, group.rows[name]))
            rows = torch.tensor([r + [-1] * (copies - len(r)) for r in group.rows[name]], device=w.device)
            w = torch.where((rows >= 0).view(*rows.shape, *[1] * (w.dim() - 1)), w[rows.clamp_min(0)], 0)
            w = w.squeeze(1) if copies == 1 else w.flatten(1, 2) if w.dim() > 2 else w
        weights.append(w)
    return weights
