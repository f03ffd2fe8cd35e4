"""SynFlow (Tanaka et al., "Pruning neural networks without any data by iteratively conserving synaptic
flow", NeurIPS 2020).

Data-free, before training. The network is linearised (every weight, bias and BatchNorm tensor replaced by
its absolute value, BatchNorm in eval mode, as the official code does) and fed one input of all ones;
R is the sum of its output and the score of a weight its synaptic saliency dR/dtheta * theta. Scoring and
pruning alternate for `iterations` rounds (100 in the paper): after round k the weights of lowest score are
removed until the density is (1 - s)^(k / n) (the exponential schedule, `schedule: exponential`) or
1 - s k / n (`linear`), where s is `budget.sparsity`; pruned weights score zero in later rounds and stay
pruned. Ranking is global (the paper) or per layer (`budget.scope=layer`, the official code's local scope).
The masked network is then trained (the run's `retrain` stage).

`dense_classifier` leaves the output layer unpruned, like the official code's `--dense-classifier` flag
(off by default there and here); `budget.sparsity` then applies to the other layers.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.budget import unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.methods.saliency import synflow_scores
from prunelab.structure import MaskPlan, prunable_weights

SCHEDULES = ("exponential", "linear")


def sparsity_schedule(sparsity: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """The fraction of weights removed after each round 1..n (density (1 - s)^(k/n) or 1 - s k/n); the last: s."""
    if schedule == "exponential":
        steps = [1.0 - (1.0 - sparsity) ** (k / iterations) for k in range(1, iterations)]
    else:
        steps = [sparsity * k / iterations for k in range(1, iterations)]
    return [*steps, sparsity]


class SynFlow(PruningMethod):
    """Iterative synaptic-flow pruning on the linearised network, without data; then train the masked network."""

    budget_keys = ("sparsity",)

    def __init__(self, iterations: int = 100, schedule: str = "exponential", dense_classifier: bool = False):
        if not (isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1):
            raise ConfigError(f"synflow: method.iterations={iterations!r} must be a whole number >= 1 (pruning rounds)")
        if schedule not in SCHEDULES:
            raise ConfigError(f"synflow: method.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.iterations = iterations
        self.schedule = schedule
        self.dense_classifier = bool(dense_classifier)

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        names = [name for name, _ in prunable_weights(model, dense_output=self.dense_classifier)]
        plan = None
        for target in sparsity_schedule(float(ctx.budget.sparsity), self.iterations, self.schedule):
            masks = plan.masks if plan is not None else None
            scores = synflow_scores(model, names, ctx.input_shape, masks)
            # Scores span many orders of magnitude: on one scale (the largest 1) they survive the top-k's float32.
            top = max(float(s.max()) for s in scores.values())
            scores = {n: (s / top if top > 0 else s).float() for n, s in scores.items()}
            if masks is not None:
                # Pruned weights rank below every surviving one, so they stay pruned.
                scores = {n: torch.where(masks[n], s, torch.tensor(-1.0)) for n, s in scores.items()}
            plan = unstructured_plan(scores, target, ctx.budget.scope)
        return plan
