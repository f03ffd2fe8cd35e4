"""The baselines the papers compare against: L1-norm filters, first-order Taylor, weight magnitude, random,
uniform width."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunelab.budget import structured_plan, unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups, training_batches
from prunelab.structure import ChannelGroup, group_weights, prunable_weights

STRUCTURED = ("flops", "params", "latency", "layer_ratios")
UNSTRUCTURED = ("sparsity",)
#: How a filter criterion's scores compare across groups under a FLOPs, parameter or latency budget (`allocate`).
ALLOCATIONS = ("uniform", "global")


class _OneShot(PruningMethod):
    """A method that prunes once, from scores computed on the model as it is."""

    budget_keys = STRUCTURED

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]


class L1Filter(_OneShot):
    """Li et al. 2017, "Pruning Filters for Efficient ConvNets": drop the filters of smallest L1 norm.

    A group's channel score sums the L1 norms of that channel's filters over every layer producing it.
    With `budget.layer_ratios` each group loses its given fraction (the paper's per-layer setting);
    otherwise one global threshold meets the FLOPs or parameter budget, on scores divided by each
    group's maximum (`normalize: true`) so that layers of different scale compare.
    """

    def __init__(self, normalize: bool = True):
        self.normalize = normalize

    def plan(self, model: nn.Module, ctx: MethodContext):
        return structured_plan(model, l1_scores(model, prunable_groups(model, ctx), self.normalize), ctx)


def l1_scores(model: nn.Module, groups: list[ChannelGroup], normalize: bool = True) -> dict[str, torch.Tensor]:
    """Each group's channel scores: the L1 norms of the channel's filters summed over every layer producing it,
    divided by the group's largest with `normalize`."""
    scores = {}
    for group in groups:
        norms = sum(w.detach().abs().flatten(1).sum(1) for w in group_weights(model, group))
        scores[group.name] = norms / norms.max().clamp_min(1e-12) if normalize else norms
    return scores


def allocate(scores: dict[str, torch.Tensor], allocation: str) -> dict[str, torch.Tensor]:
    """Per-group scores made comparable across groups for one global threshold.

    "uniform": a channel's rank in its group, (rank + 1/2) / size from the lowest score up, so a threshold keeps
    the same fraction of every group (the per-layer pruning rate of FPGM, SFP and HRank) and the budget search
    finds that fraction; "global": scores divided by their group's largest (`L1Filter`'s `normalize`). Both keep
    each group's order, so `budget.layer_ratios` prunes the same channels under either.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    out = {}
    for name, s in scores.items():
        s = s.detach().float().cpu()
        if allocation == "global":
            out[name] = s / s.max().clamp_min(1e-12)
        else:
            ranks = torch.empty_like(s)
            ranks[torch.argsort(s, stable=True)] = torch.arange(s.numel(), dtype=s.dtype)
            out[name] = (ranks + 0.5) / s.numel()
    return out


class Taylor(_OneShot):
    """Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning": first-order Taylor scores.

    A channel's importance is the squared first-order change of the training loss when it is removed,
    (sum over its parameters s of g_s w_s)^2, averaged over `batches` training batches (test-time
    transforms, fixed order; gradients on a copy in training mode, so the model and its BatchNorm
    statistics stay as they are). Its parameters are the weight and bias of the group's BatchNorms where
    it has them (zeroing them silences the channel: the paper's variant on BatchNorm gates), else the rows
    and biases its producing layers write (an attention head's channel: its query, key and value rows).
    Channels are ranked across layers as they come, without per-layer normalisation, as in the paper.
    Deviation: a group with several BatchNorms (a residual stream, a depthwise stage) sums their g * w
    before squaring, one score per shared channel, where the paper scores each gate alone.
    """

    needs_training_data = True

    def __init__(self, batches: int = 10):
        if int(batches) < 1:
            raise ConfigError(f"method.batches={batches} must be at least 1 (training batches the scores average over)")
        self.batches = int(batches)

    def plan(self, model: nn.Module, ctx: MethodContext):
        if ctx.data is None:
            raise ValueError("taylor: scoring channels needs the experiment's training data")
        batches = training_batches(ctx.data, self.batches)
        return structured_plan(model, taylor_scores(model, prunable_groups(model, ctx), batches), ctx)


def taylor_scores(model: nn.Module, groups: list[ChannelGroup], batches: list) -> dict[str, torch.Tensor]:
    """Each group's channel scores (sum of g * w over the channel's parameters)^2, averaged over `batches`."""
    net = copy.deepcopy(model).train()
    for p in net.parameters():
        p.requires_grad_(True)
    device = next(net.parameters()).device
    totals = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for x, y in batches:
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x.to(device)), y.to(device)).backward()
        with torch.no_grad():
            for g in groups:
                totals[g.name] += _channel_products(net, g).double().cpu() ** 2
    return {name: (total / len(batches)).float() for name, total in totals.items()}


def _channel_products(net: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Sum of g * w over the parameters that make each of the group's channels (see `Taylor`)."""

    def product(p: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if p is None or p.grad is None else p * p.grad

    norms = [net.get_submodule(n) for n in group.norms]
    if norms and all(getattr(m, "weight", None) is not None and m.weight.numel() == group.size for m in norms):
        return sum(product(m.weight) + product(m.bias) for m in norms)

    def weight_and_bias(layer: nn.Module) -> torch.Tensor:
        """Each output row's weight products and its bias product, one row per output."""
        rows = product(layer.weight)
        rows = rows.flatten(1) if torch.is_tensor(rows) else layer.weight.new_zeros(layer.weight.shape[0], 1)
        bias = product(getattr(layer, "bias", None))
        return torch.cat([rows, bias[:, None] if torch.is_tensor(bias) else rows.new_zeros(rows.shape[0], 1)], 1)

    return sum(rows.sum(1) for rows in group_weights(net, group, weight_and_bias))


class Magnitude(_OneShot):
    """Unstructured magnitude pruning: remove the weights of smallest |w|, globally or per layer."""

    budget_keys = UNSTRUCTURED

    def plan(self, model: nn.Module, ctx: MethodContext):
        scores = {name: w.detach().abs() for name, w in prunable_weights(model)}
        return unstructured_plan(scores, _sparsity(ctx), ctx.budget.scope)


class Random(_OneShot):
    """Random pruning, structured (channels) or unstructured (weights), seeded by the experiment's seed."""

    def __init__(self, structured: bool = True):
        self.structured = structured
        self.budget_keys = STRUCTURED if structured else UNSTRUCTURED

    def plan(self, model: nn.Module, ctx: MethodContext):
        generator = torch.Generator().manual_seed(ctx.seed)
        if self.structured:
            scores = {g.name: torch.rand(g.size, generator=generator) for g in prunable_groups(model, ctx)}
            return structured_plan(model, scores, ctx)
        scores = {name: torch.rand(w.shape, generator=generator) for name, w in prunable_weights(model)}
        return unstructured_plan(scores, _sparsity(ctx), ctx.budget.scope)


class Uniform(_OneShot):
    """A uniformly thinner network: every group keeps the same fraction, chosen to meet the budget.

    Scores fall linearly with the channel index, so a global threshold keeps the same leading
    fraction of every group; the threshold search then finds the width that meets the FLOPs target.
    """

    def plan(self, model: nn.Module, ctx: MethodContext):
        # Half-step offsets keep groups of different sizes from tying, so the FLOPs steps are finer.
        scores = {
            g.name: 1.0 - (torch.arange(g.size, dtype=torch.float) + 0.5) / g.size for g in prunable_groups(model, ctx)
        }
        return structured_plan(model, scores, ctx)


def _sparsity(ctx: MethodContext) -> float:
    if ctx.budget.get("sparsity") is None:
        raise ValueError("unstructured pruning needs budget.sparsity (the fraction of weights to remove)")
    return float(ctx.budget.sparsity)
