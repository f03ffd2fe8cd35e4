"""Network Slimming (Liu et al. 2017): L1 on BatchNorm scales while training, then a global threshold."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.budget import structured_plan
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups
from prunelab.methods.baselines import STRUCTURED


class Slimming(PruningMethod):
    """Sparsity training with `penalty * sum |gamma|` over all BatchNorm scales, then pruning.

    A channel's score is |gamma| of the BatchNorm that normalises it (summed over the BatchNorms of a
    coupled group); one global threshold on these scores meets the FLOPs or parameter budget. The
    paper adds the sub-gradient to the gradient directly; adding the L1 term to the loss is the same
    under SGD.
    """

    budget_keys = STRUCTURED

    def __init__(self, penalty: float = 1e-4, sparsity_epochs: int | None = None, sparsity_lr: float | None = None):
        self.penalty = penalty
        self.sparsity_epochs = sparsity_epochs
        self.sparsity_lr = sparsity_lr
        self._norms: list[nn.Module] = []

    def stages(self) -> list[Stage]:
        return [Stage("sparsity", "fit", epochs=self.sparsity_epochs, lr=self.sparsity_lr), Stage("prune", "prune")]

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        # The penalty acts in the sparsity stage only, not when the pruned model is fine-tuned.
        self._norms = []
        if stage.name == "sparsity":
            self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        return model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self._norms or self.penalty == 0:
            return None
        return self.penalty * sum(m.weight.abs().sum() for m in self._norms)

    def plan(self, model: nn.Module, ctx: MethodContext):
        scores = {}
        for group in prunable_groups(model, ctx):
            if not group.norms:
                continue
            scores[group.name] = sum(model.get_submodule(n).weight.detach().abs() for n in group.norms)
        if not scores:
            raise ValueError("slimming needs BatchNorm layers after the prunable convolutions; this model has none")
        return structured_plan(model, scores, ctx)
