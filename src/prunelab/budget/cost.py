"""FLOPs and parameters of a pruned model computed from a plan, without building it."""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.budget.counting import _counting, count_params
from prunelab.structure import PRUNABLE_TYPES
from prunelab.structure.channel_group import channels_written
from prunelab.structure.layers import out_channels


class CostModel:
    """FLOPs and parameters of a pruned model computed from a plan, without building it.

    Counted once on the dense model: each conv/linear layer's multiply-accumulates (from its output
    shape, as FlopCounterMode counts them) and parameters, which group's channels it writes and which
    it reads (`ChannelGroup.layers`, `rows`, `consumers`, `reads`). Under a plan a layer's cost scales
    with its kept input and output channels, a group's BatchNorms with its kept channels, the attention products
    (query-key and attention-value) of a head group with its kept channels; everything else (pooling, other parameters)
    is taken as fixed, so `search_threshold` checks the final plan on the built model and corrects the target where
    that assumption does not hold.
    """

    def __init__(self, model: nn.Module, groups: list, input_shape: tuple[int, ...]):
        layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
        macs = dict.fromkeys(layers, 0)

        self.inputs: dict[str, tuple[int, ...]] = {}
        firsts: dict[str, int] = {}

        def hook(name):
            def record(module, inputs, output):
                self.inputs[name] = tuple(inputs[0].shape[1:])
                firsts[name] = int(inputs[0].shape[0])
                per_output = (
                    module.in_features
                    if isinstance(module, nn.Linear)
                    else (module.in_channels // module.groups * math.prod(module.kernel_size))
                )
                macs[name] += output.numel() * per_output  # one example: a first dimension of windows or rows counts

            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
        folded: set[str] = set()
        param = next(model.parameters())
        try:
            with _counting(model) as counter:
                model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        self.dense = {"flops": counter.get_total_flops() // 2, "params": count_params(model)}
        self.sizes = {g.name: g.size for g in groups}
        # An attention's layers that no group sizes and that run on its heads folded into the first dimension (MViTv2's
        # pooling convolutions, one example: a first dimension of a multiple of the heads) cost in proportion to the
        # heads.
        described = {n for g in groups for n in [*g.layers, *g.consumers]}
        for g in groups:
            heads = getattr(model.get_submodule(g.heads), "num_heads", 1) if g.heads else 1
            for name in layers:
                if (
                    heads > 1
                    and name.startswith(f"{g.heads}.")
                    and name not in described
                    and firsts.get(name, 1) % heads == 0
                ):
                    folded.add(name)
        # What an attention module computes beyond its layers (those folded over its heads aside): its products, linear
        # in its kept width.
        counted = counter.get_flop_counts()
        self.products = {
            g.name: max(
                0,
                sum(counted.get(f"{type(model).__name__}.{g.heads}", {}).values()) // 2
                - sum(n for layer, n in macs.items() if layer.startswith(f"{g.heads}.") and layer not in folded),
            )
            for g in groups
            if g.heads
        }
        for name in folded:
            macs[name] = 0
        # An attention's own layers with one output per head (Swin V2's position-bias MLP) lose a row per removed head.
        per_head = {
            f"{g.heads}.{n}": [(g.name, [int(i % g.unit == 0) for i in range(g.size)])]
            for g in groups if g.heads and g.unit > 1
            for n, m in model.get_submodule(g.heads).named_modules()
            if isinstance(m, nn.Linear) and n not in ("qkv", "proj") and m.out_features == g.size // g.unit
        }  # fmt: skip
        self.layers = []
        for name, m in layers.items():
            weight = m.weight.numel() if m.weight is not None else 0
            bias = m.bias.numel() if m.bias is not None else 0
            reads = [(g.name, g.reads.get(name)) for g in groups if name in g.consumers]
            writes = [(g.name, channels_written(g, name)) for g in groups if name in g.layers] or per_head.get(name, [])
            fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            self.layers.append((macs[name], weight, bias, fan_in, out_channels(m), writes, reads))
        self.modules = list(layers.items())
        # Parameters per channel of each norm (a BatchNorm after a concatenation holds several groups' channels).
        norms = {
            name: sum(p.numel() for p in m.parameters()) // m.num_features
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        # Per channel of each group (a norm holding a channel twice, after a concatenation of it and its copy, twice).
        self.norm_params = {
            g.name: [
                sum(norms.get(n, 0) * (len(g.rows[n][c]) if n in g.rows else 1) for n in g.norms) for c in range(g.size)
            ]
            for g in groups
        }
        # An attention's parameters with entries per head besides its layers (Swin V2's logit scale, position-bias
        # tables, LeViT's attention biases) lose a head's entries with it: parameters per channel of a group losing
        # whole heads.
        self.head_params = {
            g.name: _per_head_parameters(model.get_submodule(g.heads), bool(g.rows)) / g.size
            for g in groups if g.heads and g.unit > 1
        }  # fmt: skip
        known = self._count(None, self.widths(None))
        self.fixed = {metric: self.dense[metric] - known[metric] for metric in self.dense}

    def widths(self, plan) -> list[tuple[int, int]]:
        """Each conv/linear layer's kept input and output channels under the plan (None: the dense widths)."""

        def removed(channels) -> int:
            total = 0
            for group, per_channel in channels:
                if plan is not None and group in plan.keep:
                    kept = plan.keep[group]
                    total += (
                        plan.sizes[group] - len(kept)
                        if per_channel is None
                        else sum(per_channel) - sum(per_channel[i] for i in kept)
                    )
            return total

        return [
            (fan_in - removed(reads), fan_out - removed(writes))
            for _, _, _, fan_in, fan_out, writes, reads in self.layers
        ]

    def _count(self, plan, widths: list[tuple[int, int]]) -> dict[str, int]:
        kept = plan.kept() if plan is not None else {}
        flops = params = 0
        for (macs, weight, bias, fan_in, fan_out, *_), (inp, out) in zip(self.layers, widths):
            # A grouped convolution whose channels follow its groups is no consumer: its fan-in stays, its cost scales
            # with out.
            scale = inp * out / (fan_in * fan_out)
            flops += round(macs * scale)
            params += round(weight * scale) + (bias * out // fan_out if bias else 0)
        for name, per_channel in self.norm_params.items():
            params += (
                sum(per_channel[c] for c in plan.keep[name])
                if plan is not None and name in plan.keep
                else sum(per_channel)
            )
        params += sum(round(n * kept.get(name, self.sizes[name])) for name, n in self.head_params.items())
        flops += sum(
            round(n * kept.get(name, self.sizes[name]) / self.sizes[name]) for name, n in self.products.items()
        )
        return {"flops": flops, "params": params}

    def count(self, plan) -> dict[str, int]:
        """FLOPs (MACs) and parameters of the model with the plan applied."""
        counts = self._count(plan, self.widths(plan))
        return {metric: counts[metric] + self.fixed[metric] for metric in counts}


def _per_head_parameters(m: nn.Module, laid_out: bool) -> int:
    """How many parameters of an attention outside its Linear layers hold entries per head, as head pruning cuts them
    (`prunelab.structure.heads.prune_heads`): a laid-out attention's own parameters with heads first; else its own
    tables with heads last or one value per head, and its position-bias modules' tables with heads last."""
    heads = m.num_heads
    own = list(m.parameters(recurse=False))
    if laid_out:
        return sum(p.numel() for p in own if p.dim() and p.shape[0] == heads)
    total = sum(
        p.numel() for p in own if p.dim() and (p.shape[-1] == heads or (p.shape[0] == heads and p[0].numel() == 1))
    )
    layers = {id(getattr(m, n, None)) for n in ("qkv", "proj", "q_norm", "k_norm", "norm")}
    for child in (c for c in m.children() if id(c) not in layers):
        for sub in child.modules():
            if not isinstance(sub, nn.Linear):
                total += sum(p.numel() for p in sub.parameters(recurse=False) if p.dim() > 1 and p.shape[-1] == heads)
    return total
