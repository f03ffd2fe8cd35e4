"""Where each channel of a group sits in every parameter coupled to it: the rows its producers write, the columns its
consumers read and the scales of its norms, read from the group's Torch-Pruning dependency group.

`group_weights` gives a group's producing layers only; a method that needs the consumers too (a group-level norm over
all coupled parameters, the next layer's reconstruction of the channels) reads the slices here. Each slice names the
layer, the weight dimension that holds the channels, the layer's own indices along it and, for each, the group's
channel it belongs to (a Linear after a flatten reads every channel once per pixel: several indices per channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelab.structure.channel_group import ChannelGroup
from prunelab.structure.groups import build_graph

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@dataclass
class CoupledSlice:
    """One parameter's share of a group: `kind` is "out" (rows a producer writes), "in" (columns a consumer reads) or
    "norm" (a BatchNorm's or LayerNorm's scale); `dim` the weight dimension holding the channels; `idxs` the layer's
    own indices along it; `root` the group's channel of each index."""

    layer: str
    kind: str
    dim: int
    idxs: torch.Tensor
    root: torch.Tensor


def coupled_slices(
    model: nn.Module, groups: list[ChannelGroup], input_shape: tuple[int, int, int]
) -> dict[str, list[CoupledSlice]]:
    """Each group's coupled slices, by group name, in the order of its dependency group (the root layer first).

    Attention-head groups and groups Torch-Pruning cannot walk get an empty list. A grouped convolution's input side is
    left out (its output side, which holds the same channels, is kept), and so are layers of other types.
    """
    graph, _ = build_graph(model, tuple(input_shape))
    names = {module: name for name, module in model.named_modules()}
    out: dict[str, list[CoupledSlice]] = {}
    with graph.reading():
        for g in groups:
            out[g.name] = []
            if g.heads is not None:
                continue
            module = model.get_submodule(g.name)
            pruner = graph.get_pruner_of_module(module)
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(g.size)))
            except (ArithmeticError, IndexError, ValueError, RuntimeError):
                continue
            for item in group:
                layer, handler = item.dep.target.module, item.dep.handler
                if layer not in names or not item.idxs or None in item.root_idxs:
                    continue
                kind = _kind(graph, layer, handler)
                if kind is None:
                    continue
                transposed = bool(getattr(layer, "transposed", False))
                dim = {"out": 1 if transposed else 0, "in": 0 if transposed else 1, "norm": 0}[kind]
                out[g.name].append(
                    CoupledSlice(
                        names[layer],
                        kind,
                        dim,
                        torch.tensor([int(i) for i in item.idxs]),
                        torch.tensor([int(r) for r in item.root_idxs]),
                    )
                )
    return out


def _kind(graph, layer: nn.Module, handler) -> str | None:
    if isinstance(layer, LAYERS):
        if graph.is_out_channel_pruning_fn(handler):
            return "out"
        if graph.is_in_channel_pruning_fn(handler) and getattr(layer, "groups", 1) == 1:
            return "in"
        return None
    if (
        isinstance(layer, NORMS)
        and getattr(layer, "weight", None) is not None
        and graph.is_out_channel_pruning_fn(handler)
    ):
        return "norm"
    return None


def slice_of(weight: torch.Tensor, piece: CoupledSlice) -> torch.Tensor:
    """The slice's entries of `weight`, one row per index (the channels' dimension moved first, the rest flattened)."""
    return (
        weight.index_select(piece.dim, piece.idxs.to(weight.device)).movedim(piece.dim, 0).reshape(len(piece.idxs), -1)
    )
