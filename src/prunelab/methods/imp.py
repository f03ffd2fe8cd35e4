"""Iterative magnitude pruning (IMP): the lottery-ticket procedure of Frankle & Carbin (2019), with
rewinding to an early iteration k (Frankle et al. 2020), as open_lth's lottery runner runs it and as the
concave-regularizers paper (Fracastoro et al., Sections III and V) uses it as its baseline.

Round 0 trains the dense network. Each round r >= 1 then removes the weights of smallest magnitude
among those still kept (globally over all prunable layers, open_lth's `sparse_global`, or per layer,
`sparse_layerwise`), rewinds the survivors to their values at iteration k (`retrain=rewind`, the default;
k = `retrain.rewind_iteration`, 0 = initialisation) and trains them again with the same schedule, then
tests. A weight pruned in round r stays pruned in every later round.

The sparsity after round r is s_r = 1 - (1 - p)^r for a per-round fraction p (`prune_fraction`, 0.2 as
in open_lth); with `budget.sparsity` = s and `rounds` = R both given, p = 1 - (1 - s)^(1/R); with only
`budget.sparsity`, R is the fewest rounds of p that reach s, and the last round stops exactly at s.
open_lth prunes ceil(p * remaining) weights per round; we hit each round's overall target s_r to one
weight instead, so that the sparsity reported per round is exactly the one asked for.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.budget import BudgetError, unstructured_plan
from prunelab.methods.base import MethodContext, PruningMethod, Rounds, Stage
from prunelab.structure import MaskPlan, prunable_weights


def round_sparsities(
    prune_fraction: float = 0.2, rounds: int | None = None, sparsity: float | None = None
) -> list[float]:
    """The target sparsity after each round 1..R (see the module docstring for how R and p are chosen)."""
    if rounds is not None and (int(rounds) != rounds or rounds < 1):
        raise BudgetError(f"imp: method.rounds must be a whole number >= 1; got {rounds}")
    if sparsity is not None and not 0.0 < float(sparsity) < 1.0:
        raise BudgetError(f"imp: budget.sparsity is the fraction of weights to remove, in (0, 1); got {sparsity}")
    if rounds is not None and sparsity is not None:
        keep = (1.0 - float(sparsity)) ** (1.0 / int(rounds))
        return [1.0 - keep**r for r in range(1, int(rounds))] + [float(sparsity)]
    if not 0.0 < float(prune_fraction) < 1.0:
        raise BudgetError(f"imp: method.prune_fraction must be in (0, 1); got {prune_fraction}")
    keep = 1.0 - float(prune_fraction)
    if rounds is not None:
        return [1.0 - keep**r for r in range(1, int(rounds) + 1)]
    if sparsity is None:
        raise BudgetError("imp needs budget.sparsity (the final fraction of weights to remove) or method.rounds")
    # The fewest rounds whose compounded fraction reaches the target (the epsilon absorbs rounding).
    count = max(1, math.ceil(math.log(1.0 - float(sparsity)) / math.log(keep) - 1e-9))
    return [min(1.0 - keep**r, float(sparsity)) for r in range(1, count)] + [float(sparsity)]


class IMP(PruningMethod):
    """Iterative magnitude pruning: train, then rounds of prune -> retrain (rewind by default) -> test.

    `train_epochs` is round 0's training (None: `trainer.max_epochs`; 0 skips it, e.g. when starting
    from `backbone.pretrained`); every later round trains on the `retrain` schedule. `scope` is "global"
    (one ranking of all prunable weights) or "layer" (each tensor loses the same fraction).
    `dense_output` leaves the output layer out of pruning (open_lth does so for VGG, not for ResNets).
    """

    def __init__(
        self,
        prune_fraction: float = 0.2,
        rounds: int | None = None,
        sparsity: float | None = None,
        scope: str = "global",
        dense_output: bool = False,
        train_epochs: int | None = None,
    ) -> None:
        if scope not in ("global", "layer"):
            raise BudgetError(f"imp: budget.scope must be 'global' or 'layer'; got {scope!r}")
        self.targets = round_sparsities(prune_fraction, rounds, sparsity)
        self.scope = scope
        self.dense_output = bool(dense_output)
        self.train_epochs = train_epochs

    def stages(self) -> list[Stage | Rounds]:
        dense = [Stage("train", "fit", epochs=self.train_epochs), Stage("test", "test")]
        iterate = [Stage("prune", "prune"), Stage("retrain", "retrain"), Stage("test", "test")]
        return [Rounds(dense, count=1, start=0), Rounds(iterate, count=len(self.targets))]

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        """The weights of smallest magnitude among those still kept go, until round r's sparsity is reached."""
        target = self.targets[ctx.round - 1]
        scores = {name: w.detach().abs().float().cpu() for name, w in prunable_weights(model, self.dense_output)}
        if ctx.masks is not None:
            # Weights pruned in an earlier round rank below every surviving one, so they stay pruned.
            for name, mask in ctx.masks.masks.items():
                if name in scores:
                    scores[name] = torch.where(mask.cpu(), scores[name], torch.tensor(-1.0))
        return unstructured_plan(scores, target, self.scope)
