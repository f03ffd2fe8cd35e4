"""torchvision's attention modules rebuilt in the layout whose heads prunelab prunes.

timm's attention keeps `qkv` and `proj` Linear layers, `num_heads`, `head_dim` and `scale`, and computes
with them, so losing heads or head dimensions only means updating those. torchvision's attention
modules derive the head width from the embedding instead (`nn.MultiheadAttention` needs the two equal,
Swin's functional `shifted_window_attention` splits the embedding width into heads, MaxViT reshapes
the heads' output to the embedding), so a pruned head count cannot run. `relayout` replaces them, at
creation, by modules of the same computation in timm's layout:

- ViT's `nn.MultiheadAttention` -> `SelfAttention`
- Swin's `ShiftedWindowAttention` / `ShiftedWindowAttentionV2` -> `WindowSelfAttention`
- MaxViT's `RelativePositionalMultiHeadAttention` -> `PartitionAttention`

Each gives the stock module's outputs for the stock weights and loads state dicts written for it
(`Relaid.RENAMED` maps torchvision's tensor names to its own).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Relaid(nn.Module):
    """A module that replaces a torchvision one and loads its state dicts: `RENAMED` pairs (theirs, ours)."""

    RENAMED: tuple[tuple[str, str], ...] = ()

    @classmethod
    def rename(cls, state_dict: dict, prefix: str) -> None:
        """Give the replaced module's tensors under `prefix` in `state_dict` this module's names, in place."""
        for old, new in cls.RENAMED:
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.rename(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SelfAttention(Relaid):
    """ViT's `nn.MultiheadAttention` (an encoder block's self-attention, batch first): scaled
    dot-product attention over `num_heads` heads of `head_dim`, called as the block calls it and
    returning (output, None). Its attention width (`attn_dim`) may differ from the embedding's."""

    RENAMED = (("in_proj_weight", "qkv.weight"), ("in_proj_bias", "qkv.bias"),
               ("out_proj.weight", "proj.weight"), ("out_proj.bias", "proj.bias"))  # fmt: skip

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim, heads = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.scale = self.head_dim**-0.5
        self.dropout = float(mha.dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, **_: Any) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention computes self-attention only: key and value must be the query")
        batch, tokens, _ = query.shape
        qkv = self.qkv(query).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)), None


def _split_heads(qkv: torch.Tensor, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., tokens, 3 x heads x dim) -> query, key, value, each (..., heads, tokens, dim)."""
    q, k, v = qkv.unflatten(-1, (3, heads, dim)).movedim(-3, 0).transpose(-2, -3).unbind(0)
    return q, k, v


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, tokens, dim) -> (..., tokens, heads x dim)."""
    return x.transpose(-2, -3).flatten(-2)


class KeylessBiasLinear(nn.Linear):
    """Swin V2's query/key/value projection: the keys get no bias (torchvision drops it in the forward pass).
    A Linear called as a module, so that the graph tracer sees the projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return F.linear(x, self.weight)
        third = self.bias.numel() // 3
        bias = torch.cat([self.bias[:third], torch.zeros_like(self.bias[third : 2 * third]), self.bias[2 * third :]])
        return F.linear(x, self.weight, bias)


class WindowSelfAttention(Relaid):
    """Swin's shifted-window attention (torchvision's V1, or V2 with cosine attention, `logit_scale` and
    the position-bias MLP `cpb_mlp`) on (B, H, W, C) inputs: the map is padded to whole windows,
    rolled by the shift, attended window by window with the relative position bias (tokens from
    different regions of a shifted window masked with -100, as in the paper's code), then rolled back
    and cropped. The tensors keep torchvision's names, so its state dicts load as they are."""

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.window_size, self.shift_size = list(stock.window_size), list(stock.shift_size)
        self.num_heads = stock.num_heads
        self.head_dim = stock.qkv.out_features // (3 * stock.num_heads)
        self.attention_dropout, self.dropout = float(stock.attention_dropout), float(stock.dropout)
        self.qkv, self.proj = stock.qkv, stock.proj
        self.cosine = hasattr(stock, "logit_scale")
        if self.cosine:  # V2: the queries and keys are normalised over the head dimension, which stays whole.
            self.qkv.__class__ = KeylessBiasLinear
            self.logit_scale, self.cpb_mlp = stock.logit_scale, stock.cpb_mlp
            self.register_buffer("relative_coords_table", stock.relative_coords_table)
        else:
            self.scale = self.head_dim**-0.5
            self.relative_position_bias_table = stock.relative_position_bias_table
        self.register_buffer("relative_position_index", stock.relative_position_index)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) over the N tokens of a window."""
        tokens = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads) if self.cosine else self.relative_position_bias_table
        bias = table[self.relative_position_index].reshape(tokens, tokens, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def region_mask(self, height: int, width: int, shift: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(windows, N, N): 0 between tokens of the same region of the rolled map, -100 across regions."""
        (wh, ww), (sh, sw) = self.window_size, shift

        def regions(size: int, window: int, shift: int) -> torch.Tensor:  # 0, 1, 2 from the start; one region unshifted
            index = torch.arange(size, device=device)
            return (index >= size - window).long() + (index >= size - shift).long() if shift else torch.zeros_like(index)

        region = regions(height, wh, sh)[:, None] * 3 + regions(width, ww, sw)[None, :]
        region = region.reshape(height // wh, wh, width // ww, ww).transpose(1, 2).reshape(-1, wh * ww)
        return (region[:, None, :] != region[:, :, None]).float() * -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        (wh, ww) = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
        padded_h, padded_w = x.shape[1], x.shape[2]
        # No shift along a side that one window covers.
        shift = (self.shift_size[0] if wh < padded_h else 0, self.shift_size[1] if ww < padded_w else 0)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        grid = (padded_h // wh, padded_w // ww)
        windows = x.reshape(-1, grid[0], wh, grid[1], ww, channels).transpose(2, 3).reshape(-1, grid[0] * grid[1], wh * ww, channels)

        q, k, v = _split_heads(self.qkv(windows), self.num_heads, self.head_dim)
        if self.cosine:
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            logits = logits * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = logits + self.position_bias()
        if any(shift):
            logits = logits + self.region_mask(padded_h, padded_w, shift, x.device)[:, None]
        attention = F.dropout(logits.softmax(-1), self.attention_dropout, self.training)
        out = F.dropout(self.proj(_merge_heads(attention @ v)), self.dropout, self.training)

        out = out.reshape(-1, grid[0], grid[1], wh, ww, out.shape[-1]).transpose(2, 3).reshape(-1, padded_h, padded_w, out.shape[-1])
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :height, :width].contiguous()


class PartitionAttention(Relaid):
    """MaxViT's relative-position attention within each partition of (B, G, P, D) inputs (G windows or
    grid cells of P tokens): logits scaled by the embedding width's D^-1/2 (`scale`, MaxViT's choice), plus
    a learned bias per relative position and head."""

    RENAMED = (("to_qkv.weight", "qkv.weight"), ("to_qkv.bias", "qkv.bias"),
               ("merge.weight", "proj.weight"), ("merge.bias", "proj.bias"))  # fmt: skip

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = stock.n_heads, stock.head_dim, float(stock.scale_factor)
        self.max_seq_len = stock.max_seq_len
        self.qkv, self.proj = stock.to_qkv, stock.merge
        self.relative_position_bias_table = stock.relative_position_bias_table
        self.register_buffer("relative_position_index", stock.relative_position_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(self.qkv(x), self.num_heads, self.head_dim)
        tokens = self.max_seq_len
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(tokens, tokens, -1)
        logits = q @ (k * self.scale).transpose(-2, -1) + bias.permute(2, 0, 1)
        return self.proj(_merge_heads(logits.softmax(-1) @ v))


def _sdpa(m: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with the module's `scale` and attention dropout."""
    dropout = m.attn_drop.p if m.training and isinstance(getattr(m, "attn_drop", None), nn.Dropout) else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=m.scale)


def _heads(x: torch.Tensor, parts: int, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts x heads x dim), parts stacked -> `parts` tensors of (B, heads, N, dim)."""
    return x.unflatten(-1, (parts, heads, dim)).permute(2, 0, 3, 1, 4).unbind(0)


def _alias(name: str) -> property:
    """`num_heads` read and written as the module's own attribute `name` (where the module counts its heads so)."""
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value))


class HeadWidth:
    """A timm attention that derives its head width from the embedding (`C // num_heads`) rebuilt at creation to
    compute with its own `num_heads` x `head_dim`, so that it runs with fewer heads than the embedding was split into.
    The modules keep their class (a subclass of this and theirs), attributes and tensor names, so their state dicts
    and methods stay; only `forward` changes (same outputs for the same weights)."""

    def rebuilt(self) -> None:
        """Record the head width the module derived from the embedding (where it keeps none): its stacked `qkv`'s rows
        per head and part; nothing for modules without a stacked Linear `qkv` (lambda layers, split attention)."""
        if not isinstance(getattr(self, "head_dim", None), int) and isinstance(getattr(self, "qkv", None), nn.Linear):
            self.head_dim = self.qkv.out_features // (3 * self.num_heads)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, dim) -> the output projection of (B, N, heads x dim)."""
        out = self.proj(x.transpose(1, 2).flatten(2))
        return out if getattr(self, "proj_drop", None) is None else self.proj_drop(out)


class QueryTokenAttention(HeadWidth):
    """CaiT's class attention and CrossViT's cross-attention: the first token's query against every token's key
    and value, from three projections (`writers`: CaiT's q, k, v; CrossViT's wq, wk, wv)."""

    writers = ("q", "k", "v")

    def rebuilt(self) -> None:
        self.head_dim = getattr(self, self.writers[0]).out_features // self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (getattr(self, name) for name in self.writers)
        (q,), (k,), (v,) = (_heads(y, 1, self.num_heads, self.head_dim) for y in (q(x[:, :1]), k(x), v(x)))
        return self._out(_sdpa(self, q, k, v))

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        d = self.head_dim
        return HeadLayout([Writer(name, [(i * d, d)]) for i, name in enumerate(self.writers)], 3 * d, (2 * d, d))


class QueryKeyValueLayout(HeadWidth):
    """Queries from `q`, keys and values stacked in `kv`, `head_dim` each per head (VOLO's class attention, whose forward
    already computes with them; the base of `SubsampledAttention`)."""

    def rebuilt(self) -> None:
        self.head_dim = self.q.out_features // self.num_heads

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        d = self.head_dim
        return HeadLayout([Writer("q", [(0, d)]), Writer("kv", [(d, d), (2 * d, d)])], 3 * d, (2 * d, d))


class SeparateProjectionAttention(QueryTokenAttention):
    """Next-ViT's efficient multi-head self-attention: queries, keys and values from three projections (`q`, `k`, `v`),
    the keys and values from the tokens average-pooled by `sr` (then `norm`, over channels) where `sr_ratio` > 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (q,) = _heads(self.q(x), 1, self.num_heads, self.head_dim)
        if self.sr is not None:
            x = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        (k,), (v,) = (_heads(y, 1, self.num_heads, self.head_dim) for y in (self.k(x), self.v(x)))
        return self._out(_sdpa(self, q, k, v))


class SubsampledAttention(QueryKeyValueLayout):
    """Twins' global sub-sampled attention and PVT v2's spatial-reduction attention: queries from every token (`q`),
    keys and values (`kv`, stacked) from the map reduced by a strided convolution (`sr`, then `norm`; PVT v2's linear
    variant pools first and ends with `act`), whose width prunes on its own."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        (q,) = _heads(self.q(x), 1, self.num_heads, self.head_dim)
        if self.sr is not None:
            x = x.transpose(1, 2).unflatten(-1, tuple(size))
            x = self.norm(self.sr(x if getattr(self, "pool", None) is None else self.pool(x)).flatten(2).transpose(1, 2))
            x = x if getattr(self, "act", None) is None else self.act(x)
        k, v = _heads(self.kv(x), 2, self.num_heads, self.head_dim)
        return self._out(_sdpa(self, q, k, v))


class GroupedWindowAttention(HeadWidth):
    """Twins' locally-grouped attention: self-attention within windows of `ws` x `ws` tokens (the map padded
    with zeros to whole windows), query, key and value stacked in `qkv`."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        (height, width), ws = size, self.ws
        x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, (-width) % ws, 0, (-height) % ws))
        rows, cols = x.shape[1] // ws, x.shape[2] // ws
        x = x.reshape(batch, rows, ws, cols, ws, channels).transpose(2, 3).reshape(batch, rows * cols * ws * ws, channels)
        q, k, v = (y.unflatten(2, (rows * cols, ws * ws)).transpose(1, 2) for y in _heads(self.qkv(x), 3, self.num_heads, self.head_dim))
        x = _sdpa(self, q, k, v).permute(0, 1, 3, 2, 4).flatten(3)  # (B, windows, ws x ws, heads x dim)
        x = x.reshape(batch, rows, cols, ws, ws, -1).transpose(2, 3).reshape(batch, rows * ws, cols * ws, -1)
        return self.proj_drop(self.proj(x[:, :height, :width].reshape(batch, tokens, -1)))


class StackedAttention(HeadWidth):
    """ConViT's, VOLO's, DaViT's (windowed) and MetaFormer's (CAFormer) plain self-attention: query, key and value stacked in `qkv`, as timm's Attention, over
    (B, N, C) tokens or a (B, H, W, C) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._out(_sdpa(self, *_heads(self.qkv(x.flatten(1, -2)), 3, self.num_heads, self.head_dim)))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class MapAttention(HeadWidth):
    """FastViT's self-attention on (B, C, H, W) maps: query, key and value stacked in `qkv` over the map's positions,
    the output projection's result laid back as a map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out = self._out(_sdpa(self, *_heads(self.qkv(x.flatten(2).transpose(1, 2)), 3, self.num_heads, self.head_dim)))
        return out.transpose(1, 2).reshape(batch, -1, height, width)


class MaskUnitAttention(HeadWidth):
    """Hiera's attention within mask units (windows) or over all tokens, queries max-pooled over `q_stride`; query, key
    and value stacked in `qkv`; it counts its heads in `heads`."""

    num_heads = _alias("heads")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        if self.use_mask_unit_attn:
            windows = tokens // (self.q_stride * self.window_size)
            qkv = self.qkv(x).reshape(batch, -1, windows, 3, self.heads, self.head_dim).permute(3, 0, 4, 2, 1, 5)
        else:
            windows, qkv = 1, self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_stride > 1:  # the pooled positions lie q_stride apart within each unit (timm's Unroll)
            q = q.unflatten(-2, (self.q_stride, -1)).amax(dim=-3)
        x = _sdpa(self, q, k, v)
        x = x.transpose(1, 3) if self.use_mask_unit_attn else x.transpose(1, 2)
        return self.proj(x.reshape(batch, -1, self.heads * self.head_dim))


class CosineWindowAttention(HeadWidth):
    """timm's Swin V2 (CR) windowed attention: scaled cosine attention with a logit scale per head and a position bias
    per head from the meta MLP (`meta_mlp`, one output per head), query, key and value stacked in `qkv`."""

    def rebuilt(self) -> None:
        self.head_dim = self.qkv.out_features // (3 * self.num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale.reshape(1, -1, 1, 1), max=math.log(100.0)).exp()
        attn = attn + self._relative_positional_encodings()
        if mask is not None:
            windows, tokens = mask.shape[0], x.shape[1]
            attn = (attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)).flatten(0, 1)
        return self._out(self.attn_drop(attn.softmax(dim=-1)) @ v)


class DimensionMajorAttention(HeadWidth):
    """NesT's attention on (B, blocks, tokens, C): query, key and value stacked in `qkv`, and the heads' outputs laid
    out dimension by dimension for `proj` (column d x heads + h holds dimension d of head h): `proj_dim_major`."""

    proj_dim_major = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, blocks, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, blocks, tokens, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        x = _sdpa(self, *qkv.unbind(0)).permute(0, 2, 3, 4, 1).reshape(batch, blocks, tokens, -1)
        return self.proj_drop(self.proj(x))


class OutlookAttention(HeadWidth):
    """VOLO's outlook attention on (B, H, W, C) maps: per head, weights over each k x k window (`attn`, k^4 rows per
    head, from the pooled map) mix the unfolded values (`v`, `head_dim` per head), folded back."""

    def rebuilt(self) -> None:
        self.head_dim = self.v.out_features // self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        window, cells = self.kernel_size**2, math.ceil(height / self.stride) * math.ceil(width / self.stride)
        v = self.unfold(self.v(x).permute(0, 3, 1, 2)).reshape(batch, self.num_heads, self.head_dim, window, cells)
        attn = self.attn(self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        attn = attn.reshape(batch, cells, self.num_heads, window, window).permute(0, 2, 1, 3, 4)
        attn = self.attn_drop((attn * self.scale).softmax(dim=-1))
        x = (attn @ v.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2).reshape(batch, -1, cells)
        x = F.fold(x, output_size=(height, width), kernel_size=self.kernel_size, padding=self.padding, stride=self.stride)
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1)))

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        d, window = self.head_dim, self.kernel_size**4
        return HeadLayout([Writer("v", [(0, d)]), Writer("attn", [(d, window)])], d + window, (0, d))


class GatedPositionalAttention(HeadWidth):
    """ConViT's gated positional self-attention: per head, a gate (`gating_param`) mixes the softmax of the
    query-key logits (`qk`, stacked) with that of a positional score (`pos_proj`, one row per head over the
    relative positions); values from `v`."""

    def rebuilt(self) -> None:
        self.head_dim = self.v.out_features // self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rel_indices is None or self.rel_indices.shape[1] != x.shape[1]:
            self.rel_indices = self.get_rel_indices(x.shape[1])
        (v,) = _heads(self.v(x), 1, self.num_heads, self.head_dim)
        return self._out(self.get_attention(x) @ v)

    def get_attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k = _heads(self.qk(x), 2, self.num_heads, self.head_dim)
        position = self.pos_proj(self.rel_indices.expand(x.shape[0], -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        patch = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        attn = (1.0 - gate) * patch + gate * position
        return self.attn_drop(attn / attn.sum(dim=-1, keepdim=True))

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        d = self.head_dim
        writers = [Writer("qk", [(0, d), (d, d)]), Writer("v", [(2 * d, d)]), Writer("pos_proj", [(3 * d, 1)])]
        return HeadLayout(writers, 3 * d + 1, (2 * d, d))


class QueryKeyValueAttention(HeadWidth):
    """TNT's attention: queries and keys stacked in `qk` (`head_dim` each per head), values from `v` with a width of
    their own per head; timm's forward already computes with `num_heads`, so only the layout is added."""

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        d, dv = self.head_dim, self.v.out_features // self.num_heads
        return HeadLayout([Writer("qk", [(0, d), (d, d)]), Writer("v", [(2 * d, dv)])], 2 * d + dv, (2 * d, dv))


class RelativePositionAttention(HeadWidth):
    """timm's ViT with relative position biases: `qkv` stacked, a bias per head from its `rel_pos` module (a table or
    an MLP, whose heads are pruned with the attention's) or shared by the model."""

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        return self._out(x)


class ChannelGroupAttention(HeadWidth):
    """DaViT's channel attention: per head, a softmax over the head's channels of the keys' and values' products
    across tokens, applied to the queries; `qkv` stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
        return self._out((attn @ q.transpose(-1, -2)).transpose(-1, -2))


class CrossCovarianceAttention(HeadWidth):
    """EdgeNeXt's and XCiT's cross-covariance attention (XCA): per head, a softmax over the head's channels of the
    channels' cosine similarities across tokens, times a learned `temperature`; `qkv` stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (y.transpose(-2, -1) for y in _heads(self.qkv(x), 3, self.num_heads, self.head_dim))  # (B, heads, dim, N)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return self._out((self.attn_drop(attn.softmax(-1)) @ v).transpose(-2, -1))


class TalkingHeadsAttention(HeadWidth):
    """CaiT's talking-heads attention: the heads' logits are mixed across heads before (`proj_l`) and after
    (`proj_w`) the softmax, so no head can leave alone; every head keeps the same fewer dimensions instead
    (`heads_mix`: the head group prunes by dimension)."""

    heads_mix = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        attn = self.proj_l(((q * self.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._out(self.attn_drop(attn) @ v)


class LinearAttention(HeadWidth):
    """MobileViTv2's separable self-attention, each of its key/value channel pairs a head of width 1: a query row
    shared by all (`qkv_proj`'s first, kept whole) weighs the tokens, whose weighted keys give each channel a
    context that scales the channel's rectified value. Its `embed_dim` channels of key and of value are its heads
    (`num_heads`, the same attribute), so timm's forward runs as it is."""

    def rebuilt(self) -> None:
        self.head_dim = 1

    num_heads = _alias("embed_dim")

    def head_layout(self):
        from prunelab.structure.groups import HeadLayout, Writer

        return HeadLayout([Writer("qkv_proj", [(0, 1), (1, 1)], offset=1)], 2, (1, 1), proj="out_proj")


class GlobalQueryAttention(HeadWidth):
    """GCViT's window attention: query, key and value stacked in `qkv` (local blocks), or key and value stacked and the
    queries taken from the stage's global query (`q_global`, the stream's channels split into heads), a position bias
    per head (`rel_pos`). A global block's heads stay whole (`keep_whole`): its queries are channels of the stream."""

    def rebuilt(self) -> None:
        if self.use_global:
            self.keep_whole = self.qkv.keep_whole = True

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_global and q_global is not None:
            k, v = _heads(self.qkv(x), 2, self.num_heads, self.head_dim)
            q = q_global.repeat_interleave(x.shape[0] // q_global.shape[0], dim=0).reshape(*x.shape[:2], -1)
            (q,) = _heads(q, 1, self.num_heads, self.head_dim)
        else:
            q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        attn = self.rel_pos((q * self.scale) @ k.transpose(-2, -1))
        return self._out(self.attn_drop(attn.softmax(dim=-1)) @ v)


class PoolingAttention(HeadWidth):
    """MViTv2's pooling attention: timm's forward, whose output width `dim_out` is read here as the heads' joint width
    (it is the stream's width only while no head is removed). Its pooling convolutions, norms and position tables
    act on the head dimension, shared by all heads, so heads leave whole and keep their dimension (`head_dim_whole`);
    with pooling unshared across heads (`conv_unshared`) they stay whole (`keep_whole`)."""

    head_dim_whole = True
    dim_out = property(lambda self: self.num_heads * self.head_dim, lambda self, value: None)

    def rebuilt(self) -> None:
        vars(self).pop("dim_out", None)
        if self.unshared:
            self.keep_whole = self.qkv.keep_whole = True


class LambdaWidth(HeadWidth):
    """timm's lambda layer, whose output (heads x value dimensions) is laid out to the input's width: computed with its
    own widths, so that its input channels (the layer before it) prune apart from its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        q, k, v = torch.split(self.qkv(x), [self.num_heads * self.dim_qk, self.dim_qk, self.dim_v], dim=1)
        q = self.norm_q(q).flatten(2).unflatten(1, (self.num_heads, self.dim_qk)).transpose(-1, -2)  # (B, heads, M, K)
        v = self.norm_v(v).flatten(2).transpose(-1, -2)  # (B, M, V)
        content = q @ (k.flatten(2).softmax(dim=-1) @ v).unsqueeze(1)  # (B, heads, M, V)
        if self.pos_emb is None:
            position = self.conv_lambda(v.reshape(batch, 1, height, width, self.dim_v))  # (B, K, H, W, V)
            position = position.reshape(batch, 1, self.dim_qk, height * width, self.dim_v).transpose(2, 3)
        else:
            table = self.pos_emb[self.rel_pos_indices[0], self.rel_pos_indices[1]].expand(batch, -1, -1, -1)
            position = (table.transpose(-1, -2) @ v.unsqueeze(1)).unsqueeze(1)
        out = content + (q.unsqueeze(-2) @ position).squeeze(-2)
        return self.pool(out.transpose(-1, -2).reshape(batch, -1, height, width))


class PartialSingleHeadAttention(HeadWidth):
    """SHViT's single-head attention on the stream's first `pdim` channels: queries and keys (`qk_dim` each) and values
    from `qkv` (a convolution and its BatchNorm), the values' output concatenated with the untouched channels. Computed
    with the widths its layers have and the stream's two parts in a list of their own (`sections`, which surgery sets),
    so the stream prunes apart from `pdim` and `dim`; queries, keys and values stay whole."""

    def rebuilt(self) -> None:
        self.sections = [self.pdim, self.dim - self.pdim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        x1, x2 = torch.split(x, self.sections, dim=1)
        qkv = self.qkv(self.pre_norm(x1)).flatten(2)
        q, k, v = torch.split(qkv, [self.qk_dim, self.qk_dim, qkv.shape[1] - 2 * self.qk_dim], dim=1)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(batch, -1, height, width)
        return self.proj(torch.cat([x1, x2], dim=1))


class RadixSplitAttention(HeadWidth):
    """ResNeSt's split attention with `radix` > 1 splits (cardinality 1): the radix splits of `conv`'s output taken as
    equal chunks (not a reshape to (B, radix, C)), summed, and weighed by a softmax across the chunks of `fc2`'s
    output computed chunk by chunk, so that a channel leaves every split at once (tied blocks); same outputs. Each
    chunk passes an operation of its own before chunks meet (the graph follows a chunk per reader), and the softmax's
    stabilising maximum is a constant to it (detached: the softmax does not depend on it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radix == 1 or self.rsoftmax.cardinality != 1:
            return super().forward(x)
        splits = self.act0(self.drop(self.bn0(self.conv(x)))).chunk(self.radix, dim=1)
        gap = sum(split.mean((2, 3), keepdim=True) for split in splits)
        logits = self.fc2(self.act1(self.bn1(self.fc1(gap)))).chunk(self.radix, dim=1)
        top = torch.stack([logit.detach() for logit in logits]).amax(dim=0)
        weights = [torch.exp(logit - top) for logit in logits]
        total = sum(weights)
        return sum(w / total * split for w, split in zip(weights, splits))


# timm's attention modules rebuilt by `relayout` (module.Class: the class they take, with these class attributes).
_TIMM = {
    "timm.models.cait.ClassAttn": (QueryTokenAttention, {}),
    "timm.models.cait.TalkingHeadAttn": (TalkingHeadsAttention, {}),
    "timm.models.crossvit.CrossAttention": (QueryTokenAttention, {"writers": ("wq", "wk", "wv")}),
    "timm.models.twins.GlobalSubSampleAttn": (SubsampledAttention, {}),
    "timm.models.twins.LocallyGroupedAttn": (GroupedWindowAttention, {}),
    "timm.models.pvt_v2.Attention": (SubsampledAttention, {}),
    "timm.models.convit.MHSA": (StackedAttention, {}),
    "timm.models.volo.Attention": (StackedAttention, {}),
    "timm.models.davit.WindowAttention": (StackedAttention, {}),
    "timm.models.metaformer.Attention": (StackedAttention, {}),
    "timm.models.davit.ChannelAttention": (ChannelGroupAttention, {}),
    "timm.models.volo.OutlookAttention": (OutlookAttention, {}),
    "timm.models.volo.ClassAttention": (QueryKeyValueLayout, {}),
    "timm.models.convit.GPSA": (GatedPositionalAttention, {}),
    "timm.models.edgenext.CrossCovarianceAttn": (CrossCovarianceAttention, {}),
    "timm.models.xcit.XCA": (CrossCovarianceAttention, {}),
    "timm.models.tnt.Attention": (QueryKeyValueAttention, {}),
    "timm.models.vision_transformer_relpos.RelPosAttention": (RelativePositionAttention, {}),
    "timm.models.mobilevit.LinearSelfAttention": (LinearAttention, {}),
    "timm.models.fastvit.Attention": (MapAttention, {}),
    "timm.models.nextvit.EfficientAttention": (SeparateProjectionAttention, {}),
    "timm.models.hiera.MaskUnitAttention": (MaskUnitAttention, {}),
    "timm.models.nest.Attention": (DimensionMajorAttention, {}),
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": (CosineWindowAttention, {}),
    "timm.models.gcvit.WindowAttentionGlobal": (GlobalQueryAttention, {}),
    "timm.models.mvitv2.MultiScaleAttention": (PoolingAttention, {}),
    "timm.layers.lambda_layer.LambdaLayer": (LambdaWidth, {}),
    "timm.models.shvit.SHSA": (PartialSingleHeadAttention, {}),
    "timm.layers.split_attn.SplitAttn": (RadixSplitAttention, {}),
}
_REBUILT: dict[type, type] = {}


_CASCADED = "timm.models.efficientvit_msra.CascadedGroupAttention"


def _rebuild_timm(module: nn.Module) -> None:
    """Give a timm attention listed in `_TIMM` its `HeadWidth` class and head width, in place."""
    cls = type(module)
    mixin, attributes = _TIMM[f"{cls.__module__}.{cls.__name__}"]
    if cls not in _REBUILT:
        _REBUILT[cls] = type(cls.__name__, (mixin, cls), {"__module__": __name__, **attributes})
    module.__class__ = _REBUILT[cls]
    module.rebuilt()


def relayout(model: nn.Module) -> None:
    """Replace torchvision's attention modules in `model` by their `Relaid` equivalents, and give timm's that derive
    their head width from the embedding a `HeadWidth` forward (`_TIMM`), in place."""
    for module in list(model.modules()):
        if f"{type(module).__module__}.{type(module).__name__}" in _TIMM:
            _rebuild_timm(module)
        elif type(module).__name__ == "BlurPool2d" and getattr(module, "channels", None) is not None:
            # timm's anti-aliasing blur (TResNet) holds one copy of its fixed filter per channel, a buffer no pruner
            # cuts: it shares one, expanded to the channels it gets (its `channels` None), with the same outputs.
            module.channels, module.filt = None, module.filt[:1].clone()
    # EfficientViT-M's cascaded group attention adds each head's output to the next head's chunk of its input, so a
    # head's values are tied to a chunk of the stream it reads: that attention and the stream its projection writes stay
    # whole, with the reason (Torch-Pruning maps neither; its FFNs and the rest prune).
    cascaded = [name for name, m in model.named_modules() if f"{type(m).__module__}.{type(m).__name__}" == _CASCADED]
    for name in cascaded:
        for layer in model.get_submodule(name).modules():
            layer.keep_whole = True
    if cascaded:
        logging.getLogger("prunelab").warning(
            "%d cascaded group attention(s) kept whole (%s%s): each head adds its output to the next head's chunk of the "
            "stream, so their values and the stream they write keep their channels",
            len(cascaded), cascaded[0], ", ..." if len(cascaded) > 1 else "")
    # A position bias the model shares among its blocks has every head: the heads, and the bias's layer with one output
    # per head, stay whole (`keep_whole`, read by groups_from_graph and attention_heads).
    shared = getattr(model, "shared_rel_pos", None)
    if isinstance(shared, nn.Module):
        for module in model.modules():
            if isinstance(module, RelativePositionAttention):
                module.keep_whole = True
            elif isinstance(module, nn.Linear) and module in set(shared.modules()) and module.out_features == shared.num_heads:
                module.keep_whole = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__ if type(child).__module__.startswith("torchvision.") else None
            if isinstance(child, nn.MultiheadAttention) and type(parent).__name__ == "EncoderBlock":
                if child.batch_first and child._qkv_same_embed_dim and child.bias_k is None and not child.add_zero_attn:
                    setattr(parent, name, SelfAttention(child))
            elif kind in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
                setattr(parent, name, WindowSelfAttention(child))
            elif kind == "RelativePositionalMultiHeadAttention":
                setattr(parent, name, PartitionAttention(child))
