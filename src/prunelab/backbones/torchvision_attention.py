"""torchvision's attention modules rebuilt in timm's layout (`qkv` and `proj` Linear layers, `num_heads` x `head_dim`),
each with the stock module's outputs for the stock weights and loading the stock module's state dicts."""

from __future__ import annotations

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
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

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention computes self-attention only: key and value must be the query")
        batch, tokens, _channels = query.shape
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

    # Buffers (registered below), which torch's typing would read as `Tensor | Module`.
    relative_position_index: torch.Tensor
    relative_coords_table: torch.Tensor

    def __init__(self, stock: Any) -> None:  # torchvision's ShiftedWindowAttention(V2), read by duck typing
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
        table = (
            self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads)
            if self.cosine
            else self.relative_position_bias_table
        )
        bias = table[self.relative_position_index].reshape(tokens, tokens, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def region_mask(self, height: int, width: int, shift: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(windows, N, N): 0 between tokens of the same region of the rolled map, -100 across regions."""
        (wh, ww), (sh, sw) = self.window_size, shift

        def regions(size: int, window: int, shift: int) -> torch.Tensor:  # 0, 1, 2 from the start; one region unshifted
            index = torch.arange(size, device=device)
            return (
                (index >= size - window).long() + (index >= size - shift).long() if shift else torch.zeros_like(index)
            )

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
        windows = (
            x.reshape(-1, grid[0], wh, grid[1], ww, channels)
            .transpose(2, 3)
            .reshape(-1, grid[0] * grid[1], wh * ww, channels)
        )

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

        out = (
            out.reshape(-1, grid[0], grid[1], wh, ww, out.shape[-1])
            .transpose(2, 3)
            .reshape(-1, padded_h, padded_w, out.shape[-1])
        )
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :height, :width].contiguous()


class PartitionAttention(Relaid):
    """MaxViT's relative-position attention within each partition of (B, G, P, D) inputs (G windows or
    grid cells of P tokens): logits scaled by the embedding width's D^-1/2 (`scale`, MaxViT's choice), plus
    a learned bias per relative position and head."""

    RENAMED = (("to_qkv.weight", "qkv.weight"), ("to_qkv.bias", "qkv.bias"),
               ("merge.weight", "proj.weight"), ("merge.bias", "proj.bias"))  # fmt: skip

    relative_position_index: torch.Tensor  # a buffer (registered below)

    def __init__(self, stock: Any) -> None:  # torchvision's RelativePositionalMultiHeadAttention, read by duck typing
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
