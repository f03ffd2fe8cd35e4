"""SFP (He et al. 2018, "Soft Filter Pruning for Accelerating Deep Convolutional Neural Networks").

Algorithm 1: after every training epoch, in every layer i, the N_{i+1} P_i filters of least L2 norm are set
to zero; all filters, the zeroed ones included, keep training in the next epoch, so a filter zeroed too early
can grow back and another take its place. After the last epoch the zeroed filters are removed for good.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.budget import plan_by_counts, structured_plan, tie_scores
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups
from prunelab.methods.baselines import ALLOCATIONS, STRUCTURED, allocate
from prunelab.structure import ChannelGroup, ChannelPlan, group_weights


class SoftFilterPruning(PruningMethod):
    """A "soft" fit stage that zeroes the lowest-L2 filters after every `interval` epochs (and the last), then a
    "prune" stage that removes the set zeroed last, from the final weights.

    A channel's norm is the L2 norm of every weight writing it (the rows of all layers producing the group
    joined). How many channels each group zeroes is fixed when the stage starts: `budget.layer_ratios` gives it
    per group; a FLOPs, parameter or latency budget gives the counts of the plan the budget search finds on the
    starting weights' norms (`allocation: uniform`, the default, makes every group lose the same fraction, the
    paper's one pruning rate P for all layers; `global` ranks norms divided by their group's largest). Only the
    filters (the producing layers' weight rows) are zeroed, as the official code does: biases and BatchNorms stay.
    The counts, the epoch and the zeroed sets are the method's state, so a resumed stage zeroes as an unbroken
    one would. The pipeline's `retrain` runs after the prune (the paper needs none: `retrain=none`).
    """

    budget_keys = STRUCTURED

    def __init__(
        self, epochs: int | None = None, lr: float | None = None, interval: int = 1, allocation: str = "uniform"
    ):
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ConfigError(f"sfp: method.epochs={epochs!r} must be null (trainer.max_epochs) or a whole number >= 1")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"sfp: method.lr={lr!r} must be null (optimizer.lr) or a number > 0")
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError(
                f"sfp: method.interval={interval!r} must be a whole number >= 1 (epochs between zeroings)"
            )
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"sfp: method.allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        self.epochs = epochs
        self.lr = lr
        self.interval = interval
        self.allocation = allocation
        self.epoch = 0
        self.counts: dict[str, int] = {}
        self.zeroed: dict[str, list[int]] = {}
        self._groups: list[ChannelGroup] = []
        self._active = False
        self._stage_epochs = 1

    def stages(self) -> list[Stage]:
        return [Stage("soft", "fit", epochs=self.epochs, lr=self.lr), Stage("prune", "prune")]

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        # Filters are zeroed in the soft stage only, not while the pruned model is fine-tuned.
        self._active = stage.name == "soft"
        if self._active:
            self._groups = prunable_groups(model, ctx)
            plan = structured_plan(model, allocate(filter_norms(model, self._groups), self.allocation), ctx)
            self.counts = {name: len(kept) for name, kept in plan.keep.items()}
        return model

    def on_train_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self._stage_epochs = epochs

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self._active and ((epoch + 1) % self.interval == 0 or epoch + 1 >= self._stage_epochs):
            self.zeroed = self.zero_lowest_(model)
            self.epoch = epoch + 1

    def zero_lowest_(self, model: nn.Module) -> dict[str, list[int]]:
        """Zero, in each group, the filters of least L2 norm beyond its kept count; returns the zeroed channels."""
        groups = [g for g in self._groups if g.name in self.counts]
        scores = tie_scores(filter_norms(model, groups), groups)
        kept = plan_by_counts(
            scores, self.counts, {g.name: g.unit for g in groups}, {g.name: g.blocks for g in groups}
        ).keep
        zeroed = {}
        with torch.no_grad():
            for g in groups:
                zeroed[g.name] = sorted(set(range(g.size)) - set(kept[g.name]))
                zero_filters_(model, g, zeroed[g.name])
        return zeroed

    def plan(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan:
        if not self.zeroed:
            # No soft epoch ran (method.epochs=0 is refused; trainer.max_epochs=0): prune by norm at once.
            groups = prunable_groups(model, ctx)
            return structured_plan(model, allocate(filter_norms(model, groups), self.allocation), ctx)
        sizes = {g.name: g.size for g in prunable_groups(model, ctx) if g.name in self.zeroed}
        keep = {name: sorted(set(range(size)) - set(self.zeroed[name])) for name, size in sizes.items()}
        return ChannelPlan(keep=keep, sizes=sizes)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "counts": dict(self.counts), "zeroed": dict(self.zeroed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}
        self.zeroed = {k: [int(i) for i in v] for k, v in state.get("zeroed", {}).items()}


def filter_norms(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Each group's channel scores: the L2 norm of all the weights writing the channel (every producing layer's row)."""
    return {
        g.name: torch.sqrt(sum(w.detach().double().pow(2).flatten(1).sum(1) for w in group_weights(model, g)))
        .float()
        .cpu()
        for g in groups
    }


def zero_filters_(model: nn.Module, group: ChannelGroup, channels: list[int]) -> None:
    """Set to zero the weight rows that write the group's `channels`, in every layer producing them."""
    if not channels:
        return
    if group.heads is not None and not group.rows:
        weight = model.get_submodule(group.name).weight
        weight.data.view(3, group.size, -1)[:, channels] = 0
        return
    for name in group.layers:
        weight = model.get_submodule(name).weight
        rows = [r for c in channels for r in group.rows[name][c]] if name in group.rows else channels
        weight.data[rows] = 0
