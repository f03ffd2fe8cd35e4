"""SNIP (Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019).

Once, before training: the connection sensitivity of every prunable weight, |g * w| with g = dL/dw on a
few training batches at the starting weights (the paper's score, whose normalisation by the sum of all
sensitivities changes no ranking), then one global top-k keeps the 1 - `budget.sparsity` most sensitive
weights. The masked network is then trained (the run's `retrain` stage, `retrain=finetune` by default:
the starting weights are kept and trained under the mask).

The official code prunes every conv and linear weight, the classifier included, on one mini-batch;
so does this method (no dense-classifier option).
"""

from __future__ import annotations

from torch import nn

from prunelab.budget import unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, training_batches
from prunelab.methods.saliency import snip_scores
from prunelab.structure import MaskPlan, prunable_weights


class SNIP(PruningMethod):
    """Prune once at the starting weights by connection sensitivity |g * w|, then train the masked network.

    `batches` training batches (test-time transforms, fixed order) give the gradient; the paper uses one.
    """

    budget_keys = ("sparsity",)
    needs_training_data = True

    def __init__(self, batches: int = 1):
        if not (isinstance(batches, int) and not isinstance(batches, bool) and batches >= 1):
            raise ConfigError(f"snip: method.batches={batches!r} must be a whole number >= 1 (training batches scored)")
        self.batches = batches

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        if ctx.data is None:
            raise ValueError("snip: scoring weights needs the experiment's training data")
        names = [name for name, _ in prunable_weights(model)]
        scores = snip_scores(model, names, training_batches(ctx.data, self.batches))
        return unstructured_plan(scores, float(ctx.budget.sparsity), ctx.budget.scope)
