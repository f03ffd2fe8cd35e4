"""LAMP (Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR 2021).

The LAMP score of a weight u of a layer is w_u^2 divided by the sum of w_v^2 over the weights v of the same
layer at least as large (|w_v| >= |w_u|, u itself included). Within a layer it orders the weights as their
magnitudes do; across layers it sets the sparsity of each, and one global ranking of the scores removes
`budget.sparsity` of all prunable weights (exact to one weight). The official code scores every conv and
linear weight, the classifier included (no dense-classifier option). Pruning is one-shot here; the paper
also prunes iteratively with retraining between rounds. Training afterwards is the run's `retrain` stage
(`retrain=finetune` by default).
"""

from __future__ import annotations

from torch import nn

from prunelab.budget import unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.methods.saliency import lamp_scores
from prunelab.structure import MaskPlan, prunable_weights


class LAMP(PruningMethod):
    """One-shot global pruning by LAMP score (layer-adaptive magnitude pruning)."""

    budget_keys = ("sparsity",)

    def __init__(self, scope: str = "global"):
        if scope != "global":
            raise ConfigError(
                f"lamp: budget.scope={scope!r}: LAMP ranks its scores across layers (budget.scope=global); "
                "per layer it is magnitude pruning (method=magnitude budget.scope=layer)"
            )

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        return unstructured_plan(lamp_scores(dict(prunable_weights(model))), float(ctx.budget.sparsity), "global")
