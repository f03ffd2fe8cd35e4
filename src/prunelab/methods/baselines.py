"""The baselines the papers compare against: L1-norm filters, weight magnitude, random, uniform width."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.budget import structured_plan, unstructured_plan
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups
from prunelab.structure import group_weights, prunable_weights


STRUCTURED = ("flops", "params", "latency", "layer_ratios")
UNSTRUCTURED = ("sparsity",)


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
        scores = {}
        for group in prunable_groups(model, ctx):
            norms = sum(w.detach().abs().flatten(1).sum(1) for w in group_weights(model, group))
            scores[group.name] = norms / norms.max().clamp_min(1e-12) if self.normalize else norms
        return structured_plan(model, scores, ctx)


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
