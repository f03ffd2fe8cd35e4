"""Lottery jackpots (Zhang et al., "Lottery Jackpots Exist in Pre-trained Models"): SR-popup and edge-popup.

Both methods search a binary mask on FROZEN pretrained weights. Every prunable weight gets a relaxed score
m; the forward pass multiplies the weight by a binary mask h(m) that keeps a fixed number of weights, and
the backward pass hands the mask's gradient straight through to the scores (dL/dm = dL/dh(m), Eq. 6).
After every optimizer step the scores are compared with the mask: kept weights whose score fell out of
the top-k and pruned weights whose score entered it are candidate swaps (Eq. 28). Edge-popup (Ramanujan
et al.) makes them all, i.e. the mask is always the top-k of the scores; SR-popup's short restriction makes
only the q_t = ceil(n_t (1 - t/T)^4) pairs with the largest expected loss drop (Eqs. 29-30): the revived
weights with the highest scores paired with the re-pruned weights with the lowest. The two differ only in
that restriction and in how the scores start (Eq. 8 for SR-popup, Kaiming-uniform for edge-popup), so they
share one class here.

t counts iterations (optimizer steps) and T is the search's total, as in the paper's Algorithm 1. The
official code instead computes the factor once per epoch as ceil((1 - epoch/E)^4), which is 1 for every
epoch, so it makes all candidate swaps (edge-popup with magnitude initialisation); we follow the paper.

Per layer or global. The paper's equations rank the scores of all weights together (Eqs. 5 and 28) and
restrict the swaps once over all of them (Eq. 29): `allocation="global"`, whose layer ratios start at
the global magnitude pruning's and then move. The official code (and our default, "magnitude") keeps
those ratios fixed: every layer ranks its own scores and makes its own q_t swaps between its own
weights. The two differ most at the start of a search. The scores all start at 1 or eta, but their
gradients dL/dh = dL/d(w h) w differ between layers by orders of magnitude (on the pretrained CIFAR
ResNet-20 at 90%: about 6e-3 in the classifier, 2e-3 in the first conv and the last block's second
conv, 1e-4 to 5e-4 elsewhere), so a global ranking first swaps weights between those few layers by
gradient scale, not by expected loss drop: in one run, the first three steps moved a quarter of the
classifier's and a fifth of the first conv's kept weights into the last block's second conv, and the
network fell to chance accuracy.
`layer_grad_norm` puts every layer's score gradient on one scale, which removes that drift.

The mask found by the search becomes the run's MaskPlan in the "prune" stage that follows it; weights are
never trained unless a retraining stage is asked for (`retrain=finetune`, the paper's Table 6 / Fig. 8).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunelab.budget import BudgetError, keep_top, keep_top_global
from prunelab.errors import ConfigError
from prunelab.io import write_json
from prunelab.methods.base import MethodContext, PruningMethod, Stage, sgd, training_batches
from prunelab.methods.saliency import CRITERIA, criterion_scores
from prunelab.structure import (
    MaskParametrization,
    MaskPlan,
    attach_mask,
    detach_masks,
    freeze,
    model_record,
    prunable_weights,
    unfreeze,
)

log = logging.getLogger("prunelab")

ALLOCATIONS = ("magnitude", "uniform", "global")


class _MaskedWeight(torch.autograd.Function):
    """Forward: the weight times the binary mask held by the search. Backward: the mask's gradient,
    dL/dh = dL/d(masked weight) * weight, passed straight through to the scores.

    One product forward and one backward, nothing else of the weight's size: no copy of the mask, and
    with `absolute` the sign of the scores is applied in the backward pass instead of taking |scores|
    in every forward pass. With `grad_scale`, dL/dh is rescaled to that mean magnitude first.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        absolute: bool,
        grad_scale: float | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, scores, mask)
        ctx.absolute, ctx.grad_scale = absolute, grad_scale
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad * mask.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = grad * weight
            if ctx.grad_scale is not None:
                grad_scores.mul_(ctx.grad_scale / grad_scores.abs().mean().clamp_min(torch.finfo(grad.dtype).tiny))
            if ctx.absolute:
                grad_scores.mul_(torch.sign(scores))
            grad_scores = grad_scores.to(scores.dtype)
        return grad_weight, grad_scores, None, None, None


class ScoredMask(MaskParametrization):
    """The parametrization `weight -> weight * h(m)` of one layer: relaxed scores and the binary mask.

    The scores are the only trainable tensor of the search. The mask is a buffer, so that a resumed
    search continues from the same mask; it changes only through `ScoreSearch.after_optimizer_step`.
    With `absolute`, the ranking and the gradient go through |m| (edge-popup ranks score magnitudes).
    With `grad_scale`, the mask's gradient is rescaled in every backward pass to that mean magnitude.
    """

    def __init__(
        self, scores: torch.Tensor, mask: torch.Tensor, absolute: bool = False, grad_scale: float | None = None
    ):
        super().__init__()
        self.scores = nn.Parameter(scores.detach().clone().float())
        self.register_buffer("mask", mask.detach().clone().float())
        self.absolute = absolute
        self.grad_scale = grad_scale

    def key(self) -> torch.Tensor:
        """The values the top-k ranks."""
        return self.scores.abs() if self.absolute else self.scores

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskedWeight.apply(weight, self.scores, self.mask, self.absolute, self.grad_scale)

    def binary(self) -> torch.Tensor:
        return self.mask.bool()


def swap_count(candidates: int, step: int, total_steps: int, restrict: bool, exponent: float = 4.0) -> int:
    """How many of the candidate swaps to make after iteration `step` (1-based) of `total_steps`.

    Without restriction all of them (edge-popup); with it q_t = ceil(n_t (1 - t/T)^exponent) (Eq. 29).
    """
    if not restrict:
        return candidates
    remaining = max(0.0, 1.0 - step / total_steps)
    return min(candidates, math.ceil(candidates * remaining**exponent))


def swap_(key: torch.Tensor, kept: torch.Tensor, allowed: Callable[[int], int] | None = None) -> tuple[int, int]:
    """Swap kept and pruned entries of one group in place; returns (candidate pairs, pairs swapped).

    `key` holds the updated scores, `kept` the current mask (flat booleans, modified in place). The
    candidates are the pruned entries now inside the top-k of `key` and the kept entries now outside it
    (k = the number kept, ties kept as they are), always equally many (Eq. 28). `allowed` maps the number
    of candidate pairs to the number to swap (None: all, which leaves `kept` equal to the top-k). The
    pairs with the largest expected loss drop go first: revived entries by decreasing score, re-pruned
    ones by increasing score (Eq. 30).
    """
    top = keep_top(key, int(kept.sum()), kept)
    revive = torch.nonzero(top & ~kept).flatten()
    prune = torch.nonzero(kept & ~top).flatten()
    candidates = revive.numel()
    swaps = candidates if allowed is None else min(allowed(candidates), candidates)
    if swaps:
        values = key.detach().float()
        revive = revive[keep_top(values[revive], swaps)]
        prune = prune[keep_top(-values[prune], swaps)]
        kept[revive] = True
        kept[prune] = False
    return candidates, swaps


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Eq. 7: the fraction of entries on which two flat masks agree (kept in both or pruned in both)."""
    return float((a == b).sum()) / a.numel() if a.numel() else 1.0


def _flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """All masks as one flat tensor, in the order of the dict."""
    return torch.cat([m.detach().flatten() for m in masks.values()])


class ScoreSearch(PruningMethod):
    """A mask search on frozen weights with straight-through top-k scores: what SR-popup and edge-popup share.

    Stages: "search" (a fit stage that trains only the scores: SGD with the given lr, momentum and weight
    decay, cosine schedule over `epochs`), then "prune", which hands the found mask to the pipeline.

    `sparsity` is the fraction of the scored weights to remove. `allocation` fixes how many weights each
    layer keeps: "magnitude" takes the layer ratios of a global magnitude pruning of the pretrained
    weights and keeps them through the search (the official code's default), "uniform" removes
    `sparsity` from every layer, "global" ranks the scores of all layers together at every step so that
    the layer ratios can move. `dense_classifier` leaves the output layer (the last conv/linear layer) out
    of the search and dense, as the official code does; `sparsity` then applies to the other layers.
    `layer_grad_norm` rescales every layer's score gradient, at every step, to one mean magnitude (the
    mean |dL/dh| over all scored weights at the initial mask, on the criterion batches), so that a
    global ranking compares the layers on one scale; it is meant for `allocation="global"`.

    The trainer gives the search's total iterations T when the search starts; the experiment's
    datamodule (from `bind`) gives the batches of the snip and grasp criteria and of `layer_grad_norm`.
    `overlap_with` names the criteria whose masks are compared with the searched mask (Eq. 7) after
    every step. Under the global allocation every step's record also holds each layer's kept count.

    BatchNorm: like the official code, the search runs in training mode with every model parameter
    (BN scales and shifts included) frozen, so BN running statistics follow the masked network during
    the search and are the ones the found network is evaluated with.
    """

    budget_keys = ("sparsity",)

    #: Whether the scores are ranked by magnitude (and their gradient taken through |m|).
    absolute_scores: bool = False
    #: Whether the method is meant for pretrained weights (a warning says so when none are loaded).
    requires_pretrained: bool = False

    def __init__(
        self,
        sparsity: float | None = None,
        epochs: int = 30,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        allocation: str = "magnitude",
        dense_classifier: bool = False,
        short_restriction: bool = True,
        exponent: float = 4.0,
        overlap_with: Iterable[str] = (),
        criterion_batches: int = 1,
        layer_grad_norm: bool = False,
    ):
        name = type(self).__name__.lower()
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"{name}: method.allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        unknown = [c for c in overlap_with if c not in CRITERIA]
        if unknown:
            raise ConfigError(
                f"{name}: method.overlap_with has unknown criteria {unknown} (choose from {', '.join(CRITERIA)})"
            )
        if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
            raise ConfigError(f"{name}: budget.sparsity={sparsity} is the fraction of weights to remove, in [0, 1)")
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ConfigError(f"{name}: method.epochs={epochs!r} must be a whole number >= 1 (search epochs)")
        if not (isinstance(criterion_batches, int) and criterion_batches >= 1):
            raise ConfigError(f"{name}: method.criterion_batches={criterion_batches!r} must be a whole number >= 1")
        self.sparsity = sparsity
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.allocation = allocation
        self.dense_classifier = dense_classifier
        self.short_restriction = short_restriction
        self.exponent = exponent
        self.overlap_with = list(overlap_with)
        self.criterion_batches = criterion_batches
        self.layer_grad_norm = layer_grad_norm
        self.data: Any = None
        self.seed = 0
        self.total_steps = 0
        self.history: list[dict[str, Any]] = []
        self._layers: dict[str, ScoredMask] = {}
        self._references: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, bool] = {}
        self._epoch_start = 0

    def stages(self) -> list[Stage]:
        optimizer = sgd(self.lr, self.momentum, self.weight_decay)
        scheduler = {"_target_": "prunelab.lit.cosine", "_partial_": True}
        search = Stage("search", "fit", epochs=self.epochs, lr=self.lr, optimizer=optimizer, scheduler=scheduler)
        return [search, Stage("prune", "prune")]

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        """Before the search: freeze every parameter and attach scores and masks to the scored weights."""
        if stage.name != "search":
            return model
        weights = self._scored_weights(model)
        counts = self._keep_counts(weights)
        needed = {self._initial_criterion()} | set(self.overlap_with)
        needed.discard(None)
        criteria = {c: self._criterion_mask(model, weights, counts, c) for c in CRITERIA if c in needed}
        scores, masks = self._initial_scores(model, weights, counts, criteria)
        self._references = {c: _flat(criteria[c]) for c in self.overlap_with}
        self._frozen = freeze(model)
        self._layers = {}
        for name, weight in weights.items():
            layer = ScoredMask(scores[name], masks[name], absolute=self.absolute_scores).to(weight.device)
            self._layers[name] = attach_mask(model, name, layer)
        if self.layer_grad_norm:
            scale = self._mean_mask_gradient(model)
            for layer in self._layers.values():
                layer.grad_scale = scale
        self.history = []
        self._epoch_start = 0
        return model

    def parameters_to_train(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The scores during the search; the weights in any later fit stage (e.g. retrain=finetune)."""
        if not self._layers:
            return model.parameters()
        return [layer.scores for layer in self._layers.values()]

    def bind(self, ctx: MethodContext) -> None:
        """The experiment's datamodule (criterion batches) and seed."""
        self.data = ctx.data
        self.seed = ctx.seed
        if self.requires_pretrained and not ctx.pretrained:
            log.warning(
                "%s searches a mask in PRETRAINED weights, but backbone.pretrained is not set: "
                "the search runs on a random initialisation",
                type(self).__name__,
            )

    def on_fit_start(self, model: nn.Module, stage: str, total_steps: int) -> None:
        """T, the search's total iterations, as the trainer will run them."""
        if stage == "search":
            self.total_steps = total_steps

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """The swaps of the last step and the current overlaps with the criteria's masks, for the logger."""
        if not self._layers or not self.history:
            return {}
        last = self.history[-1]
        return {"swaps": float(sum(last["swaps"])), **{k: v for k, v in last.items() if k.startswith("overlap/")}}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Swap weights in and out of the mask after the scores moved (Eqs. 28-30).

        `step` counts the steps before this one, so this is iteration t = step + 1 of T (Algorithm 1).
        """
        if not self._layers:
            return
        t = step + 1
        total = max(self.total_steps, t)

        def allowed(candidates: int) -> int:
            return swap_count(candidates, t, total, self.short_restriction, self.exponent)

        record: dict[str, Any] = {"step": t, "candidates": [], "swaps": []}
        with torch.no_grad():
            for key, kept, write in self._groups():
                candidates, swaps = swap_(key, kept, allowed)
                write(kept)
                record["candidates"].append(candidates)
                record["swaps"].append(swaps)
            if self.allocation == "global":
                # The layer ratios move only under the global ranking: record each layer's kept count.
                record["kept"] = [int(layer.mask.sum()) for layer in self._layers.values()]
            if self._references:
                current = _flat(self.masks())
                self._references = {c: ref.to(current.device) for c, ref in self._references.items()}
                record.update({f"overlap/{c}": overlap(current, ref) for c, ref in self._references.items()})
        self.history.append(record)

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Report the epoch's swaps and the current overlaps in the run's log."""
        epoch_records = self.history[self._epoch_start :]
        self._epoch_start = len(self.history)
        if self._layers and epoch_records:
            swaps = sum(sum(r["swaps"]) for r in epoch_records)
            last = epoch_records[-1]
            overlaps = ", ".join(f"{k[8:]} {v:.4f}" for k, v in last.items() if k.startswith("overlap/"))
            log.info("search epoch %d: %d swaps; overlap with %s", epoch, swaps, overlaps or "-")

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """After the search: record the found mask as the model's masks, restore the plain weights.

        The weights come back exactly as they were (the parametrization's original tensors); the "prune"
        stage then applies the mask.
        """
        if stage.name != "search" or not self._layers:
            return model
        found = MaskPlan({name: mask.cpu() for name, mask in self.masks().items()})
        detach_masks(model, fold=False)
        unfreeze(model, self._frozen)
        self._layers = {}
        model_record(model).masks = found
        return model

    def state_dict(self) -> dict[str, Any]:
        """The search's per-step record, so that a resumed search writes all of it."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self._epoch_start = len(self.history)

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        """The mask the search found; the search's per-step record is written beside the run."""
        found = model_record(model).masks
        if found is None:
            raise RuntimeError(f"{type(self).__name__}: the prune stage found no searched mask on the model")
        if self.history:
            write_json(ctx.run_dir / "search_history.json", self.history, indent=None)
            if ctx.logger is not None:
                for record in self.history:
                    metrics = {f"search/{k}": v for k, v in record.items() if k.startswith("overlap/")}
                    metrics["search/swaps"] = sum(record["swaps"])
                    ctx.logger.log_metrics(metrics, step=record["step"])
        return found

    def masks(self) -> dict[str, torch.Tensor]:
        """The current binary mask of every scored weight (True keeps the weight)."""
        return {name: layer.mask.bool() for name, layer in self._layers.items()}

    def _groups(self) -> list[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], Any]]]:
        """(scores key, kept mask, a function writing the mask back) per layer, or one for all layers."""
        layers = list(self._layers.values())
        if self.allocation != "global":

            def writer(layer: ScoredMask) -> Callable[[torch.Tensor], Any]:
                return lambda kept: layer.mask.copy_(kept.view_as(layer.mask))

            return [(layer.key().detach().flatten(), layer.mask.bool().flatten(), writer(layer)) for layer in layers]
        key = torch.cat([layer.key().detach().flatten() for layer in layers])
        kept = torch.cat([layer.mask.bool().flatten() for layer in layers])

        def write_all(kept: torch.Tensor) -> None:
            for layer, part in zip(layers, kept.split([each.mask.numel() for each in layers])):
                layer.mask.copy_(part.view_as(layer.mask))

        return [(key, kept, write_all)]

    def _initial_criterion(self) -> str | None:
        """The criterion whose mask the search starts from (None: the scores decide)."""
        return None

    def _mean_mask_gradient(self, model: nn.Module) -> float:
        """The mean |dL/dh| over all scored weights under the current masks, on the criterion batches.

        The model's buffers (BN running statistics) are restored afterwards, so the search starts
        exactly as it would without this measurement.
        """
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        modes = {module: module.training for module in model.modules()}
        # The search runs in training mode (BN normalises by batch statistics), so measure it there.
        model.train()
        scores = [layer.scores for layer in self._layers.values()]
        total = [torch.zeros_like(s) for s in scores]
        batches = self._data_batches("layer_grad_norm")
        device = scores[0].device
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            total = [t + g for t, g in zip(total, torch.autograd.grad(loss, scores))]
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for module, training in modes.items():
            module.train(training)
        magnitude = sum(float(t.abs().sum()) for t in total) / (len(batches) * sum(t.numel() for t in total))
        if magnitude == 0.0:
            raise ValueError(f"{type(self).__name__}: layer_grad_norm found no gradient on the scores")
        return magnitude

    def _initial_scores(
        self,
        model: nn.Module,
        weights: dict[str, torch.Tensor],
        counts: dict[str, int] | int,
        criteria: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The starting scores and mask of every scored weight, given the criteria's masks."""
        raise NotImplementedError

    def _scored_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights the search masks: every conv/linear weight, the output layer's too unless dense."""
        weights = dict(prunable_weights(model, dense_output=self.dense_classifier))
        if not weights:
            raise ValueError(f"{type(self).__name__}: the model has no conv/linear weights to search")
        return weights

    def _keep_counts(self, weights: dict[str, torch.Tensor]) -> dict[str, int] | int:
        """Weights kept per layer (or in all, for the global allocation), exact to one weight."""
        if self.sparsity is None or not 0.0 <= float(self.sparsity) < 1.0:
            raise BudgetError(f"{type(self).__name__} needs budget.sparsity in [0, 1); got {self.sparsity}")
        p = float(self.sparsity)
        total = sum(w.numel() for w in weights.values())
        kept = total - round(p * total)
        if self.allocation == "global":
            return kept
        if self.allocation == "uniform":
            return {name: w.numel() - round(p * w.numel()) for name, w in weights.items()}
        magnitude = keep_top_global({n: w.detach().abs() for n, w in weights.items()}, kept)
        return {name: int(mask.sum()) for name, mask in magnitude.items()}

    def _criterion_mask(
        self, model: nn.Module, weights: dict[str, torch.Tensor], counts: dict[str, int] | int, criterion: str
    ) -> dict[str, torch.Tensor]:
        """The mask a pruning criterion gives under this search's allocation (per layer or global)."""
        batches = self._data_batches(f"the {criterion} criterion") if criterion in ("snip", "grasp") else []
        scores = criterion_scores(model, weights, criterion, batches, self.seed)
        if isinstance(counts, int):
            return keep_top_global(scores, counts)
        return {name: keep_top(s, counts[name]) for name, s in scores.items()}

    def _data_batches(self, purpose: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A few training batches (test-time transforms, fixed order) for the data-driven criteria."""
        if self.data is None:
            raise ValueError(f"{type(self).__name__}: {purpose} needs `data` (the datamodule)")
        return training_batches(self.data, self.criterion_batches)


class Jackpot(ScoreSearch):
    """SR-popup: scores start from a pruning criterion's mask (Eq. 8), swaps follow the short restriction.

    `criterion` is magnitude (|w|, the paper's choice), snip (|w g|), grasp (-w Hg; like GraSP, the
    weights with the largest values are removed) or random. Kept weights start at 1, pruned ones at
    `eta` (0.99), so the first forward pass uses exactly the criterion's mask.
    """

    requires_pretrained = True

    def __init__(self, criterion: str = "magnitude", eta: float = 0.99, **kwargs: Any):
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
        super().__init__(**kwargs)
        self.criterion = criterion
        self.eta = eta

    def _initial_criterion(self) -> str | None:
        return self.criterion

    def _initial_scores(
        self,
        model: nn.Module,
        weights: dict[str, torch.Tensor],
        counts: dict[str, int] | int,
        criteria: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        masks = criteria[self.criterion]
        scores = {name: torch.where(m, 1.0, self.eta).float() for name, m in masks.items()}
        return scores, masks


class EdgePopup(ScoreSearch):
    """Edge-popup (Ramanujan et al. 2020) on pretrained weights: Kaiming-uniform scores, top-k of |m|.

    All candidate swaps are made after every step (no restriction), so the mask is always the top-k of
    the score magnitudes, as in edge-popup's forward pass.
    """

    absolute_scores = True

    def __init__(self, short_restriction: bool = False, **kwargs: Any):
        super().__init__(short_restriction=short_restriction, **kwargs)

    def _initial_scores(
        self,
        model: nn.Module,
        weights: dict[str, torch.Tensor],
        counts: dict[str, int] | int,
        criteria: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(int(self.seed))
        scores = {}
        for name, w in weights.items():
            s = torch.empty(w.shape)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=generator)
            scores[name] = s
        magnitudes = {name: s.abs() for name, s in scores.items()}
        if isinstance(counts, int):
            return scores, keep_top_global(magnitudes, counts)
        return scores, {name: keep_top(s, counts[name]) for name, s in magnitudes.items()}
