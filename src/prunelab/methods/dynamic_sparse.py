"""Dynamic sparse training: what SET (`methods/set.py`) and RigL (`methods/rigl.py`) share.

The network trains sparse from the first step: every masked layer keeps a fixed number of weights (its density
from `budget.densities`: ERK, ER or uniform, adding up to `budget.sparsity`), and every `update_every` optimizer
steps, while t < T_end, each layer drops the fraction f_t of its active weights of smallest magnitude and grows
as many connections, chosen by the method (at random for SET, by the largest |dense gradient| for RigL). As in
the RigL code (`SparseRigLOptimizer._get_update_ops`): n_drop = floor(f_t * active); the grown connections are
taken among all positions left inactive by the drop, the just-dropped ones included, so kept and grown sets are
disjoint; a newly grown connection starts at zero, and one dropped and grown back in the same update keeps its
value (the code's `reinit_when_same=False`).

As the code does (`SparseRigLOptimizer.reset_momentum`, every slot), the optimizer's state of a newly grown
connection (SGD's momentum, Adam's moments) is zeroed (`reset_optimizer_state`); a connection dropped and grown
back in the same update keeps its own.

Deviation, one line: drop ties are broken by position (prunelab's one top-k) instead of the code's 1e-5 noise.

The masks are `DynamicMask` parametrizations (the one way prunelab attaches masks); the fit stage "sparse" is
followed by a "prune" stage whose MaskPlan is the final mask, so retraining, export and the summary see an
ordinary unstructured plan. Masks, the step and update counters, the growth RNG and the per-update record live
in `state_dict`, so a run killed mid-stage resumes to the same masks and weights as an unbroken one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prunelab.budget import DISTRIBUTIONS, keep_counts, keep_top
from prunelab.distributed import world
from prunelab.errors import ConfigError
from prunelab.io import write_json
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.structure import MaskPlan, WeightMask, attach_mask, detach_masks, model_record, prunable_weights
from prunelab.structure.masks import stored

log = logging.getLogger("prunelab")

INITS = ("random", "magnitude")
STAGE = "sparse"


class DynamicMask(WeightMask):
    """A binary mask that the method rewrites during training; optionally records the dense gradient.

    With `capture` set, the gradient of the loss with respect to the effective (masked) weight, dL/d(w * m),
    is summed into `dense_grad` by a hook on the masked weight: dense, i.e. also at the masked positions,
    which the gradient reaching the stored weight (dL/dw = dL/d(w * m) * m) is not.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask)
        self.capture = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask
        if self.capture and masked.requires_grad:
            masked.register_hook(self._record)
        return masked

    def _record(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad


def drop_and_grow(
    weight: torch.Tensor, mask: torch.Tensor, fraction: float, grow_score: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One layer's update: (new mask, newly grown positions, connections dropped), all flat, on `mask`'s device.

    The floor(fraction * active) active weights of smallest |w| are dropped; as many positions not kept are grown,
    those of largest `grow_score` (ties by position).
    """
    kept_before = mask.flatten().bool()
    active = int(kept_before.sum())
    dropped = math.floor(fraction * active)
    if dropped == 0:
        return kept_before.clone(), torch.zeros_like(kept_before), 0
    magnitude = weight.detach().flatten().abs().float()
    inactive_low = torch.full_like(magnitude, -math.inf)
    kept = keep_top(torch.where(kept_before, magnitude, inactive_low), active - dropped)
    score = grow_score.detach().flatten().float().to(kept.device)
    grown = keep_top(torch.where(kept, torch.full_like(score, -math.inf), score), dropped)
    return kept | grown, grown & ~kept_before, dropped


class DynamicSparse(PruningMethod):
    """The shared machinery: layer densities, the initial mask, the update schedule, state and the final plan.

    `sparsity` is the fraction of the masked weights removed (every masked layer's count is fixed);
    `distribution` the layer densities (erk, er, uniform); `init` the initial mask: "random" at those densities
    (the papers, from scratch) or "magnitude" (each layer's largest weights, for a pretrained start).
    `dense_first_layer` leaves the first conv/linear layer unmasked and outside the budget, as the RigL code does
    (CIFAR: prune_first_layer=False; ImageNet: first_layer_sparsity=0, "not pruned or masked");
    `dense_last_layer` does the same for the classifier (the RigL code masks it). `update_every` is Delta T in
    optimizer steps; updates happen at steps t (1-based) with t % update_every == 0 and t < end * T, T the
    stage's optimizer steps. `epochs` is the stage's length (None: trainer.max_epochs).
    """

    budget_keys = ("sparsity",)
    #: The method's name in messages (set, rigl).
    name = "dynamic_sparse"
    #: Whether growth needs the dense gradient of the update step's batch.
    needs_dense_grad = False

    def __init__(
        self,
        sparsity: float | None = None,
        distribution: str = "erk",
        init: str = "random",
        update_every: int | None = 100,
        end: float = 0.75,
        dense_first_layer: bool = True,
        dense_last_layer: bool = False,
        epochs: int | None = None,
    ):
        name = self.name
        if sparsity is not None and not (
            isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 < float(sparsity) < 1.0
        ):
            raise ConfigError(f"{name}: budget.sparsity={sparsity!r} is the fraction of weights removed, in (0, 1)")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"{name}: method.distribution={distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")
        if init not in INITS:
            raise ConfigError(f"{name}: method.init={init!r} is not one of {', '.join(INITS)}")
        if update_every is not None and not (
            isinstance(update_every, int) and not isinstance(update_every, bool) and update_every >= 1
        ):
            raise ConfigError(f"{name}: method.update_every={update_every!r} must be a whole number of steps >= 1")
        if not (isinstance(end, (int, float)) and not isinstance(end, bool) and 0.0 < float(end) <= 1.0):
            raise ConfigError(
                f"{name}: method.end={end!r} is the fraction of the stage's steps with updates, in (0, 1]"
            )
        if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1):
            raise ConfigError(f"{name}: method.epochs={epochs!r} must be a whole number >= 1 (or null)")
        self.sparsity = None if sparsity is None else float(sparsity)
        self.distribution = distribution
        self.init = init
        self.update_every = update_every
        self.end = float(end)
        self.dense_first_layer = bool(dense_first_layer)
        self.dense_last_layer = bool(dense_last_layer)
        self.epochs = epochs
        self.seed = 0
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.step = 0
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self.generator = torch.Generator()
        self._layers: dict[str, DynamicMask] = {}
        self._stored: dict[str, torch.Tensor] = {}
        self._final: dict[str, torch.Tensor] = {}
        # The positions the last update grew anew, per layer (shaped as the weight), until the optimizer is reset.
        self._fresh: dict[str, torch.Tensor] = {}

    # The drop fraction f_t and the growth scores are what the methods differ in.
    def drop_fraction(self, t: int) -> float:
        """f_t, the fraction of each layer's active weights dropped at update step t."""
        raise NotImplementedError

    def grow_scores(self, name: str, layer: DynamicMask, weight: torch.Tensor) -> torch.Tensor:
        """Scores of the positions of one layer; the largest among those not kept are grown."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        return [Stage(STAGE, "fit", epochs=self.epochs), Stage("prune", "prune")]

    def bind(self, ctx: MethodContext) -> None:
        self.seed = int(ctx.seed)

    def masked_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights the method masks: every conv/linear weight but the dense first (and last) layer."""
        weights = prunable_weights(model)
        if self.dense_last_layer:
            weights = weights[:-1]
        if self.dense_first_layer:
            weights = weights[1:]
        if not weights:
            raise ValueError(f"{self.name}: the model has no conv/linear weights left to mask")
        return dict(weights)

    def counts(self, model: nn.Module) -> dict[str, int]:
        """Weights kept per masked layer: the distribution's densities, adding up exactly to the budget."""
        if self.sparsity is None:
            raise ConfigError(f"{self.name} trains at a fixed sparsity: set budget.sparsity")
        shapes = {name: tuple(w.shape) for name, w in self.masked_weights(model).items()}
        return keep_counts(shapes, self.sparsity, self.distribution)

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        """Before the sparse stage: the initial masks at the layer counts, masked weights set to zero."""
        if stage.name != STAGE:
            return model
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = self.updates = 0
        self.history = []
        self._layers, self._stored, self._fresh = {}, {}, {}
        counts = self.counts(model)
        with torch.no_grad():
            for name, weight in self.masked_weights(model).items():
                if self.init == "random":
                    score = torch.rand(weight.shape, generator=self.generator)
                else:
                    score = weight.detach().abs().cpu()
                mask = keep_top(score, counts[name]).to(weight.device)
                weight.mul_(mask)
                self._layers[name] = attach_mask(model, name, DynamicMask(mask))
                module_name, _, tensor_name = name.rpartition(".")
                self._stored[name] = stored(model.get_submodule(module_name), tensor_name)
        self._set_capture()
        return model

    def on_fit_start(self, model: nn.Module, stage: str, total_steps: int) -> None:
        """T, the stage's optimizer steps (on a resume too, after the state came back)."""
        if stage == STAGE:
            self.total_steps = int(total_steps)
            self._set_capture()

    def on_train_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        if self._layers:
            self.steps_per_epoch = max(1, self.total_steps // max(epochs, 1))

    def interval(self) -> int:
        """Delta T in steps: `update_every`, or one epoch's steps when it is None."""
        return self.update_every if self.update_every is not None else max(1, self.steps_per_epoch)

    def is_update(self, t: int) -> bool:
        """Whether the masks change after optimizer step t (1-based): t % Delta T == 0 and t < T_end."""
        return t % self.interval() == 0 and t < self.end * self.total_steps

    def _set_capture(self) -> None:
        # The dense gradient is recorded only on the batch of an update step.
        capture = self.needs_dense_grad and self.total_steps > 0 and self.is_update(self.step + 1)
        for layer in self._layers.values():
            layer.capture = capture
            layer.dense_grad = None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """At update steps: drop and grow in every masked layer, after the optimizer moved the weights."""
        if not self._layers:
            return
        if self.update_every is None and not self.steps_per_epoch:
            raise ConfigError(
                f"{self.name}: method.update_every=null updates once per epoch, and no epoch has started: "
                "call epoch_start(epoch, epochs) at each epoch's start, or set method.update_every"
            )
        t = step + 1
        self.step = t
        if self.total_steps and self.is_update(t):
            self._update(t)
        self._set_capture()

    def _update(self, t: int) -> None:
        fraction = self.drop_fraction(t)
        self._fresh = {}
        record: dict[str, Any] = {"step": t, "drop_fraction": fraction, "dropped": [], "grown": [], "regrown": []}
        with torch.no_grad():
            for name, layer in self._layers.items():
                weight = self._stored[name]
                new, fresh, dropped = drop_and_grow(weight, layer.mask, fraction, self.grow_scores(name, layer, weight))
                # Dropped weights are zeroed, and so are new connections (grown from zero); the rest keep their values.
                # The weight may be strided (channels-last, DDP's buckets): the flat masks are shaped, not the weight
                # flattened.
                weight.mul_((new & ~fresh).view(weight.shape).to(weight.dtype))
                layer.mask.copy_(new.view(layer.mask.shape))
                self._fresh[name] = fresh.view(weight.shape)
                record["dropped"].append(dropped)
                record["grown"].append(dropped)
                # Dropped and grown back in this update: the code's "same" connections, which keep their weight.
                record["regrown"].append(dropped - int(fresh.sum()))
        self.updates += 1
        self.history.append(record)

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After an update: every per-weight slot the optimizer keeps for a newly grown connection set to zero."""
        fresh, self._fresh = self._fresh, {}
        for name, grown in fresh.items():
            weight = self._stored[name]
            for value in optimizer.state.get(weight, {}).values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.masked_fill_(grown.to(value.device), 0)

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """At an update step: the connections dropped and grown over all layers, and the drop fraction."""
        if not self._layers or not self.history or self.history[-1]["step"] != self.step:
            return {}
        last = self.history[-1]
        return {
            "dropped": float(sum(last["dropped"])),
            "grown": float(sum(last["grown"])),
            "regrown": float(sum(last["regrown"])),
            "drop_fraction": float(last["drop_fraction"]),
        }

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if self._layers:
            log.info("%s epoch %d: %d mask updates so far", self.name, epoch, self.updates)

    def masks(self) -> dict[str, torch.Tensor]:
        """The current mask of every masked weight (True keeps it), on the CPU."""
        if self._layers:
            return {name: layer.mask.detach().bool().cpu().clone() for name, layer in self._layers.items()}
        return {name: mask.clone() for name, mask in self._final.items()}

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """After the sparse stage: the masks folded into the weights and recorded as the model's masks."""
        if stage.name != STAGE or not self._layers:
            return model
        self._final = self.masks()
        detach_masks(model, fold=True)
        self._layers, self._stored, self._fresh = {}, {}, {}
        model_record(model).masks = MaskPlan(dict(self._final))
        return model

    def state_dict(self) -> dict[str, Any]:
        """Masks, the step and update counters, the growth RNG and the per-update record."""
        return {
            "masks": self.masks(),
            "step": self.step,
            "updates": self.updates,
            "rng": self.generator.get_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = dict(state.get("masks", {}))
        self.step = int(state.get("step", 0))
        self.updates = int(state.get("updates", 0))
        self.history = list(state.get("history", []))
        if "rng" in state:
            self.generator.set_state(state["rng"])
        if self._layers:
            with torch.no_grad():
                for name, layer in self._layers.items():
                    layer.mask.copy_(masks[name].to(layer.mask.device).view_as(layer.mask))
            # The dense gradient is captured for the step after the restored one (a user's loop may set the length
            # before the state comes back).
            self._set_capture()
        else:
            self._final = {name: mask.bool().clone() for name, mask in masks.items()}

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        """The final mask of the sparse stage; the per-update record is written beside the run."""
        found = model_record(model).masks
        if found is None:
            raise RuntimeError(f"{self.name}: the prune stage found no mask from the sparse stage on the model")
        if self.history:
            write_json(ctx.run_dir / f"{self.name}_updates.json", self.history, indent=None)
        return found


def dense_gradient_mean(grad: torch.Tensor) -> torch.Tensor:
    """The dense gradient of the whole global batch: the mean of the ranks' gradients under DDP (as DDP's own)."""
    _, size = world()
    if size > 1:
        grad = grad.clone()
        dist.all_reduce(grad)
        grad /= size
    return grad
