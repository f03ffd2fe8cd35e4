"""Attention heads as channel groups: the layouts of attention modules whose heads can be pruned, their groups,
and the surgery that removes heads (or head dimensions) with the module's own head bookkeeping."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from prunelab.structure.channel_group import ChannelGroup
from prunelab.structure.layers import PRUNABLE_TYPES, out_channels


def _linear_of(module: nn.Module | None) -> nn.Module | None:
    """The Linear layer (or 1x1 convolution) of a projection: itself, LeViT's LinearNorm's or ConvNorm's `linear`,
    or a Sequential's last one's."""
    if isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.stride == (1, 1)
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
        writers = (
            [Writer("qkv", [(0, 2 * kd + vd)], True)]
            if hasattr(m, "qkv")
            else [Writer("q", [(0, kd)], True), Writer("kv", [(kd, kd + vd)], True)]
        )
        layout = HeadLayout(writers, 2 * kd + vd, (2 * kd, vd))
    if layout is None or not isinstance(heads, int):
        return None
    linears = [_linear_of(getattr(m, w.attr, None)) for w in layout.writers]
    proj = _linear_of(getattr(m, layout.proj, None))
    if proj is None or any(lin is None for lin in linears) or _fan_in(proj) != heads * layout.values[1]:
        return None
    if any(
        out_channels(lin) != w.offset + heads * sum(n for _, n in w.parts) for lin, w in zip(linears, layout.writers)
    ):
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
        columns = (
            torch.sort(index % dim * heads + index // dim).values if getattr(m, "proj_dim_major", False) else index
        )
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
        ((proj_name, reads),) = group.reads.items()
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
        if (
            not key.startswith("_")
            and isinstance(value, dict)
            and any(isinstance(v, torch.Tensor) for v in value.values())
        ):
            value.clear()
