"""GraSP (Wang et al., "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020).

Once, before training: the score S = -w * Hg of every prunable weight, where g is the gradient of
the cross-entropy with the logits divided by the temperature T (200 in the paper and its code) and Hg the
Hessian-gradient product, computed by a double backward (the gradient of g . stop_grad(g)). Removing the
weights with the LARGEST S preserves (or increases) the gradient norm the most, so the 1 - `budget.sparsity`
weights with the smallest S are kept, ranked globally. The masked network is then trained (the run's `retrain`
stage).

Data as in the official code: `samples_per_class` training images of every class (10 on CIFAR-10 and on
CIFAR-100 with VGG-19; 5, twice, with ResNet-32 on CIFAR-100: `iterations`), concatenated class by class
and fed as two halves; g sums the halves' gradients and Hg their Hessian-gradient products. Here the images
are the first ones of each class in the fixed order of the training set, with test-time transforms, where
the official code draws them from its shuffled, augmented loader. Every conv and linear weight is scored,
the classifier included (the official code has no dense-classifier option).
Deviation: the official code scores on a copy whose linear layers are re-initialised (Xavier) and applies
the mask to the original; we score the weights that are kept, as the score reads.
"""

from __future__ import annotations

from torch import nn

from prunelab.budget import unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, class_balanced_batches
from prunelab.methods.saliency import GRASP_TEMPERATURE, grasp_scores
from prunelab.structure import MaskPlan, prunable_weights


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class GraSP(PruningMethod):
    """Prune once at the starting weights, removing the weights of largest -w * Hg, then train the masked network."""

    budget_keys = ("sparsity",)
    needs_training_data = True

    def __init__(self, samples_per_class: int = 10, iterations: int = 1, temperature: float = GRASP_TEMPERATURE):
        if not _whole(samples_per_class):
            raise ConfigError(f"grasp: method.samples_per_class={samples_per_class!r} must be a whole number >= 1")
        if not _whole(iterations):
            raise ConfigError(f"grasp: method.iterations={iterations!r} must be a whole number >= 1 (samples drawn)")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"grasp: method.temperature={temperature!r} must be a number > 0 (it divides the logits)")
        self.samples_per_class = samples_per_class
        self.iterations = iterations
        self.temperature = float(temperature)

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        if ctx.data is None:
            raise ValueError("grasp: scoring weights needs the experiment's training data")
        batches = class_balanced_batches(ctx.data, ctx.num_classes, self.samples_per_class, self.iterations)
        names = [name for name, _ in prunable_weights(model)]
        scores = grasp_scores(model, names, batches, self.temperature)
        # GraSP removes the largest S: the plan keeps the top of -S.
        return unstructured_plan({n: -s for n, s in scores.items()}, float(ctx.budget.sparsity), ctx.budget.scope)
