"""Reshapes, splits, slices and concatenations of channels, as traced (`_ReshapeRecorder`) and as read from autograd
nodes, and the module attributes that hold their sizes, which surgery updates."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prunelab.structure.channel_group import ChannelGroup


class _ReshapeRecorder(torch.overrides.TorchFunctionMode):
    """Records (input shape, output shape) of every view and reshape, by the autograd node of its output,
    under "tokens" whether a linear layer saw more than flat features (channels last), and for a split
    into equal chunks of a size given as a number (`x.split(k)`) the attribute of the module making it
    that holds k or the whole width (`splits`: autograd node -> (module name, attribute, chunks per unit
    of the attribute)), which surgery updates (CSP's `expand_chs`, Res2Net's `width`); for a split into sections of
    listed sizes (`x.split([a, b])`), the module attribute holding the list or one attribute per section (`sections`:
    autograd node -> (module name, attribute or attributes): InceptionNeXt's `split_indexes`, FasterNet's
    `dim_conv3` and `dim_untouched`); likewise the attribute that bounds a slice of the channels (`slices`: autograd
    node -> (module name, attribute, "start" or "end"), and the sizes of a concatenation's parts (`cats`: autograd
    node -> sizes along its dimension)."""

    def __init__(self, shapes: dict, splits: dict, sections: dict, slices: dict, cats: dict, model: nn.Module) -> None:
        super().__init__()
        self.shapes, self.splits, self.sections, self.slices, self.cats = shapes, splits, sections, slices, cats
        self.names = {m: name for name, m in model.named_modules()}
        self.running: list[nn.Module] = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def end(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            self.running.pop()

        self.hooks = [
            register_module_forward_pre_hook(lambda m, _inputs: self.running.append(m)),
            register_module_forward_hook(end),
        ]
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
            size = (
                args[1]
                if len(args) > 1
                else (kwargs or {}).get("split_size", (kwargs or {}).get("split_size_or_sections"))
            )
            owner = self.running[-1]
            found = (
                _int_attribute(owner, (size, size * len(out))) if type(size) is int and owner in self.names else None
            )
            if found is not None:
                self.splits[out[0].grad_fn] = (self.names[owner], found[0], len(out) if found[1] == size else 1)
            held = (
                _sections_attribute(owner, list(size))
                if isinstance(size, (list, tuple)) and owner in self.names
                else None
            )
            if held is not None:
                self.sections[out[0].grad_fn] = (self.names[owner], held)
        elif func is torch.cat and isinstance(out, torch.Tensor) and out.grad_fn is not None and out.dim() > 1:
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            self.cats[out.grad_fn] = [int(t.shape[dim]) for t in args[0]]
        elif (
            func is torch.Tensor.__getitem__
            and isinstance(out, torch.Tensor)
            and out.grad_fn is not None
            and self.running
        ):
            index = args[1] if len(args) > 1 else None
            # Channels first: a slice of dim 1 of a batch of maps or vectors (3-D tensors are tokens, channels last).
            cut = (
                index[1]
                if isinstance(index, tuple)
                and len(index) > 1
                and isinstance(index[1], slice)
                and args[0].dim() in (2, 4)
                else None
            )
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
