"""timm's attention modules that derive their head width from the embedding, given a forward that computes with their
own `num_heads` x `head_dim` (`HeadWidth` and its subclasses), so that they run with fewer heads."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.structure.heads import HeadLayout, Writer


def _sdpa(m: HeadWidth, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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

    if TYPE_CHECKING:
        # The mixin reads the attributes of the timm module it joins (qkv, proj, num_heads, scale, ...).
        def __getattr__(self, name: str) -> Any: ...

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
        d = self.head_dim
        return HeadLayout([Writer(name, [(i * d, d)]) for i, name in enumerate(self.writers)], 3 * d, (2 * d, d))


class QueryKeyValueLayout(HeadWidth):
    """Queries from `q`, keys and values stacked in `kv`, `head_dim` each per head (VOLO's class attention, whose
    forward already computes with them; the base of `SubsampledAttention`)."""

    def rebuilt(self) -> None:
        self.head_dim = self.q.out_features // self.num_heads

    def head_layout(self):
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
            x = self.norm(
                self.sr(x if getattr(self, "pool", None) is None else self.pool(x)).flatten(2).transpose(1, 2)
            )
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
        x = (
            x.reshape(batch, rows, ws, cols, ws, channels)
            .transpose(2, 3)
            .reshape(batch, rows * cols * ws * ws, channels)
        )
        q, k, v = (
            y.unflatten(2, (rows * cols, ws * ws)).transpose(1, 2)
            for y in _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        )
        x = _sdpa(self, q, k, v).permute(0, 1, 3, 2, 4).flatten(3)  # (B, windows, ws x ws, heads x dim)
        x = x.reshape(batch, rows, cols, ws, ws, -1).transpose(2, 3).reshape(batch, rows * ws, cols * ws, -1)
        return self.proj_drop(self.proj(x[:, :height, :width].reshape(batch, tokens, -1)))


class StackedAttention(HeadWidth):
    """ConViT's, VOLO's, DaViT's (windowed) and MetaFormer's (CAFormer) plain self-attention: query, key and value
    stacked in `qkv`, as timm's Attention, over (B, N, C) tokens or a (B, H, W, C) map."""

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
            attn = (attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)).flatten(
                0, 1
            )
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
        x = F.fold(
            x, output_size=(height, width), kernel_size=self.kernel_size, padding=self.padding, stride=self.stride
        )
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1)))

    def head_layout(self):
        d, window = self.head_dim, self.kernel_size**4
        return HeadLayout([Writer("v", [(0, d)]), Writer("attn", [(d, window)])], d + window, (0, d))


class GatedPositionalAttention(HeadWidth):
    """ConViT's gated positional self-attention: per head, a gate (`gating_param`) mixes the softmax of the
    query-key logits (`qk`, stacked) with that of a positional score (`pos_proj`, one row per head over the
    relative positions); values from `v`."""

    rel_indices: Any  # timm's module sets it: None until the first forward, then a tensor

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
        d = self.head_dim
        writers = [Writer("qk", [(0, d), (d, d)]), Writer("v", [(2 * d, d)]), Writer("pos_proj", [(3 * d, 1)])]
        return HeadLayout(writers, 3 * d + 1, (2 * d, d))


class QueryKeyValueAttention(HeadWidth):
    """TNT's attention: queries and keys stacked in `qk` (`head_dim` each per head), values from `v` with a width of
    their own per head; timm's forward already computes with `num_heads`, so only the layout is added."""

    def head_layout(self):
        d, dv = self.head_dim, self.v.out_features // self.num_heads
        return HeadLayout([Writer("qk", [(0, d), (d, d)]), Writer("v", [(2 * d, dv)])], 2 * d + dv, (2 * d, dv))


class RelativePositionAttention(HeadWidth):
    """timm's ViT with relative position biases: `qkv` stacked, a bias per head from its `rel_pos` module (a table or
    an MLP, whose heads are pruned with the attention's) or shared by the model."""

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(
            self.q_norm(q), self.k_norm(k), v, attn_mask=bias, dropout_p=dropout, scale=self.scale
        )
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
        q, k, v = (
            y.transpose(-2, -1) for y in _heads(self.qkv(x), 3, self.num_heads, self.head_dim)
        )  # (B, heads, dim, N)
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
            # The forward of timm's module, after this mixin in the method resolution order.
            return super().forward(x)  # type: ignore[misc]
        splits = self.act0(self.drop(self.bn0(self.conv(x)))).chunk(self.radix, dim=1)
        gap = sum(split.mean((2, 3), keepdim=True) for split in splits)
        logits = self.fc2(self.act1(self.bn1(self.fc1(gap)))).chunk(self.radix, dim=1)
        top = torch.stack([logit.detach() for logit in logits]).amax(dim=0)
        weights = [torch.exp(logit - top) for logit in logits]
        total = sum(weights)
        return sum(w / total * split for w, split in zip(weights, splits))


# timm's attention modules rebuilt by `relayout` (module.Class: the class they take, with these class attributes).
