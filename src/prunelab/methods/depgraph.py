"""DepGraph (Fang et al., CVPR 2023, "DepGraph: Towards Any Structural Pruning"): group-level sparse training, then a
global prune by group norms.

Every parameter coupled to a channel (its producers' rows, its consumers' columns, its norms' scales: the dependency
group) is one group. Sparse training pushes whole groups to zero with a group-norm penalty
whose strength grows for the least important groups; the importance of channel c is the group's norm over all coupled
parameters, I_c = mean over the group's parameters k of ||w_k[c]||^2 (Torch-Pruning's `GroupMagnitudeImportance(p=2)`:
squared L2 norms averaged over the parameters, divided by their mean over the group's channels so that groups of
different layers compare under one global threshold). The prune removes the channels of least importance anywhere in
the network until the budget is met (`structured_plan`), and the pipeline fine-tunes.

The regulariser is Torch-Pruning's `GroupNormPruner.regularize`, which after the backward pass adds, to the gradient of
every conv/linear row, conv/linear column and BatchNorm scale of channel c,

    reg * gamma_c * w,   gamma_c = alpha_f ** ((s_max - s_c) / (s_max - s_min)),   s_c = sqrt(I_c),

with alpha_f = 2 ** alpha (16 by default: the least important channel is pushed 16 times harder than the most
important one) and gamma held constant (computed from the weights without gradient). Here it is the `extra_loss`
0.5 * reg * sum_c gamma_c * sum ||w[c]||^2 with gamma detached, whose gradient is exactly that update; the test
compares the two on one model. Sparse training uses SGD without weight decay, as the official benchmark does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.budget import structured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups, sgd
from prunelab.methods.baselines import STRUCTURED
from prunelab.structure import ChannelGroup, CoupledSlice, coupled_slices, group_weights, slice_of


class DepGraph(PruningMethod):
    """Sparse training with the group regulariser ("sparse" fit stage), a global prune by group norm, fine-tuning.

    `reg` is the regulariser's strength, `alpha` the exponent of its largest factor (2 ** alpha), `epochs` the sparse
    training's epochs (null: `trainer.max_epochs`; 0: no sparse training, the one-shot "group norm" variant), `lr`,
    `momentum` and `weight_decay` its SGD.
    """

    budget_keys = STRUCTURED

    def __init__(
        self,
        reg: float = 5e-4,
        alpha: float = 4.0,
        epochs: int | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        for key, value, low in (("reg", reg, 0.0), ("alpha", alpha, 0.0), ("lr", lr, 0.0)):
            if not (
                isinstance(value, (int, float))
                and math.isfinite(value)
                and value >= low
                and not isinstance(value, bool)
            ):
                raise ConfigError(f"depgraph: method.{key}={value!r} must be a number >= {low:g}")
        if lr <= 0:
            raise ConfigError(f"depgraph: method.lr={lr!r} must be a number > 0")
        if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
            raise ConfigError(f"depgraph: method.epochs={epochs!r} must be null or a whole number >= 0")
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"depgraph: method.{key}={value!r} must be a number >= 0")
        self.reg, self.alpha, self.epochs = float(reg), float(alpha), epochs
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._slices: dict[str, list[CoupledSlice]] = {}

    def stages(self) -> list[Stage]:
        prune = Stage("prune", "prune")
        if self.epochs == 0:
            return [prune]
        optimizer = sgd(self.lr, self.momentum, self.weight_decay)
        return [Stage("sparse", "fit", epochs=self.epochs, lr=self.lr, optimizer=optimizer), prune]

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        # The penalty acts in the sparse training only, not when the pruned model is fine-tuned.
        self._slices = {}
        if stage.name == "sparse" and self.reg > 0:
            self._slices = coupled_slices(model, prunable_groups(model, ctx), ctx.input_shape)
        return model

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        self._slices = {}
        return model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self._slices:
            return None
        return group_penalty(model, self._slices, self.reg, 2.0**self.alpha)

    def plan(self, model: nn.Module, ctx: MethodContext):
        groups = prunable_groups(model, ctx)
        return structured_plan(model, group_norm_scores(model, groups, ctx.input_shape), ctx)


def _tensor(model: nn.Module, piece: CoupledSlice) -> torch.Tensor:
    return model.get_submodule(piece.layer).weight


def group_importance(model: nn.Module, slices: list[CoupledSlice], size: int) -> torch.Tensor | None:
    """I_c = the mean over the group's parameters of the squared L2 norm of channel c's entries (not normalised), or
    None for a group without slices."""
    total = None
    for piece in slices:
        local = slice_of(_tensor(model, piece).detach(), piece).float().pow(2).sum(1)
        total = local.new_zeros(size) if total is None else total
        total.index_add_(0, piece.root.to(local.device), local)
    return None if total is None else total / len(slices)


def group_norm_scores(
    model: nn.Module, groups: list[ChannelGroup], input_shape: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """Each group's channel importance I_c divided by its mean over the group (Torch-Pruning's normaliser, "mean").

    A group whose coupled parameters cannot be read (attention heads) scores by its producers' rows alone.
    """
    slices = coupled_slices(model, groups, input_shape)
    scores = {}
    for g in groups:
        imp = group_importance(model, slices[g.name], g.size)
        if imp is None:
            imp = sum(w.detach().float().flatten(1).pow(2).sum(1) for w in group_weights(model, g)) / len(
                g.layers or [0]
            )
        scores[g.name] = (imp / imp.mean().clamp_min(1e-30)).cpu()
    return scores


def group_penalty(model: nn.Module, slices: dict[str, list[CoupledSlice]], reg: float, factor: float) -> torch.Tensor:
    """0.5 * reg * sum over groups and channels c of gamma_c * ||w[c]||^2 over the rows, columns and BatchNorm scales of
    c, with gamma_c = factor ** ((s_max - s_c) / (s_max - s_min)) from s = sqrt(I) and no gradient through gamma.

    Its gradient is Torch-Pruning's `regularize` update, reg * gamma_c * w. LayerNorm scales count in I but are not
    penalised, as there. Deviation: a group whose channels all have the same importance gets gamma = 1 (Torch-Pruning's
    0 / 0 would give NaN).
    """
    terms = []
    for pieces in slices.values():
        if not pieces:
            continue
        with torch.no_grad():
            size = int(max(int(p.root.max()) for p in pieces)) + 1
            imp = group_importance(model, pieces, size)
            s = imp.sqrt()
            if torch.isnan(s).any():
                continue
            spread = s.max() - s.min()
            gamma = factor ** ((s.max() - s) / spread) if spread > 0 else torch.ones_like(s)
        for piece in pieces:
            layer = model.get_submodule(piece.layer)
            if piece.kind == "norm" and not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                continue
            rows = slice_of(layer.weight, piece)
            g = gamma.to(rows.device, rows.dtype)[piece.root.to(rows.device)]
            terms.append((g * rows.pow(2).sum(1)).sum())
    if not terms:
        return None
    return 0.5 * reg * torch.stack(terms).sum()
