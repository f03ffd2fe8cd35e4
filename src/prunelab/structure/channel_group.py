"""A `ChannelGroup`: the plain, picklable summary of one set of output channels that must be removed together, the
counts of channels it can keep (`keep_count`), and the weights of the layers that write them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


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


def keep_count(count: int, size: int, round_to: int = 1, unit: int = 1, multiple: int = 1) -> int:
    """Channels to keep: at least one, rounded up to a multiple of `round_to`, never more than `size`.

    A group read by grouped convolutions also rounds up to a multiple of its `unit`
    (`ChannelGroup.unit`), so that it keeps whole units, and one that must keep a multiple of some
    count (`ChannelGroup.multiple`, an attention's heads) to a multiple of that.
    """
    step = math.lcm(max(1, int(round_to)), max(1, int(unit)), max(1, int(multiple)))
    return min(size, math.ceil(max(1, int(count)) / step) * step)


def channels_written(group: ChannelGroup, layer: str) -> list[int] | None:
    """How many output channels of a producing `layer` each of the group's channels is (None: one each)."""
    if group.heads is not None and not group.rows:
        return [3] * group.size  # its query, key and value rows
    if layer in group.rows:
        return [len(r) for r in group.rows[layer]]
    return None


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
