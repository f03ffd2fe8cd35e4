"""Growing Regularization (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021).

GReg-1 (Sec. 3.2) picks the groups to prune by L1 norm on the pretrained weights (as Li et al. 2017
would) but, instead of removing them at once, puts an L2 penalty lambda on them that grows by
`delta_lambda` every `update_interval` (K_u) iterations until it passes the ceiling `tau`; the network
trains on (fixed lr, SGD) and the penalised groups shrink to nothing while the rest adapts. GReg-2
(Sec. 3.3) grows one penalty on every candidate group by `delta_lambda_pick` until it passes `tau0`,
picks the groups of least L1 norm then (the growing penalty has separated the weights by their local
curvature, Eq. 6), keeps growing theirs by `delta_lambda` up to `tau` and sets lambda = -gamma (minus
the stage's weight decay) on the kept groups, so that they recover. Both then train `stabilize_steps`
(K_s) more iterations with the penalty held, prune the penalised groups and fine-tune (Algorithm 1).

A group is a filter, as the paper defines it: every weight feeding one output channel, i.e. `weight[j]`
of every conv/linear layer producing channel j of a prunable channel group (one layer for the inner
channels of a block; all the layers that write the residual stream when `budget.prune_coupled=true`).
The layers consuming the channel (next conv's input slice) and its BatchNorm are not penalised, as in
the official code; they go with the channel when it is pruned. With `granularity="weight"` a single
weight is a group (unstructured GReg, `budget.sparsity`).

The penalty 1/2 lambda_j ||w_j||^2 is added to the loss, so its gradient is lambda_j w_j, the official
code's `grad += reg * w`; it costs one elementwise square and sum per penalised layer per step.

Table 8 gives delta_lambda = 1e-5 for GReg-2; the official code (MingSun-Tse/Regularization-Pruning)
grows at that rate while picking and at 1e-4 afterwards (`reg_granularity_pick` / `_prune`), which
is what `delta_lambda_pick` / `delta_lambda` default to here: at 1e-5 the growth from tau0 to tau
would take 99,000 updates.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from prunelab.budget import parse_layer_ratios, structured_plan, unstructured_plan
from prunelab.errors import ConfigError
from prunelab.io import atomic_write, write_json
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups, sgd
from prunelab.structure import ChannelPlan, MaskPlan, group_weights, prunable_weights

log = logging.getLogger("prunelab")

GRANULARITIES = ("filter", "weight")


def _updates_past(limit: float, delta: float, start: float = 0.0) -> int:
    """The smallest n >= 1 with start + n * delta > limit, computed as the schedule computes lambda."""
    n = max(1, math.floor((limit - start) / delta))
    while start + n * delta <= limit:
        n += 1
    while n > 1 and start + (n - 1) * delta > limit:
        n -= 1
    return n


class GrowingRegularization(PruningMethod):
    """What GReg-1 and GReg-2 share: the penalty, its schedule, the stop condition and the pruning.

    Stages: "regularize" (a fit stage that ends on the condition "lambda passed tau, then K_s steps",
    with a fixed lr, SGD with the given momentum and weight decay) and "prune" (removes the penalised
    groups, which by then have the least L1 norms by orders of magnitude; the recorded selection is
    used, so a comparison with one-shot L1 prunes exactly the same filters). The pipeline adds the
    fine-tuning (`retrain=finetune`).
    """

    #: Whether the groups are picked at the start (GReg-1) or once the penalty passed tau0 (GReg-2).
    picks_late = False

    def __init__(
        self,
        granularity: str = "filter",
        delta_lambda: float = 1e-4,
        tau: float = 1.0,
        update_interval: int = 10,
        stabilize_steps: int = 5000,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        ratio_limit: float | None = None,
    ) -> None:
        name = type(self).__name__.lower()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"{name}: method.granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}")
        for key, value in (("delta_lambda", delta_lambda), ("tau", tau), ("lr", lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: method.{key}={value!r} must be a number > 0")
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ConfigError(f"{name}: method.update_interval={update_interval!r} (K_u) must be a whole number >= 1")
        if not (isinstance(stabilize_steps, int) and stabilize_steps >= 0):
            raise ConfigError(f"{name}: method.stabilize_steps={stabilize_steps!r} (K_s) must be a whole number >= 0")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ConfigError(f"{name}: method.weight_decay={weight_decay!r} must be a number >= 0")
        if ratio_limit is not None and not (isinstance(ratio_limit, (int, float)) and ratio_limit > 1):
            raise ConfigError(f"{name}: method.ratio_limit={ratio_limit!r} must be null or a number > 1")
        self.ratio_limit = None if ratio_limit is None else float(ratio_limit)
        self.granularity = granularity
        self.budget_keys = ("sparsity",) if granularity == "weight" else ("flops", "params", "latency", "layer_ratios")
        self.delta_lambda = float(delta_lambda)
        self.tau = float(tau)
        self.update_interval = update_interval
        self.stabilize_steps = stabilize_steps
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._ctx: MethodContext | None = None
        self._layers: dict[str, list[str]] = {}
        self._groups: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._lambdas: dict[str, torch.Tensor] = {}
        self._reset()

    def _reset(self) -> None:
        self.iteration = 0
        self.phase = "pick" if self.picks_late else "grow"
        self.picks = 0  # GReg-2's updates while picking
        self.grows = 0  # updates of the pruned groups' penalty
        self.stable_from: int | None = None
        self.cause = ""
        self.ratio_ema: dict[str, float] = {}
        self.selection: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self._lambdas = {}

    # ---- the schedule -------------------------------------------------------------------------

    def lambda_pick(self) -> float:
        """GReg-2's penalty on every candidate group while picking (0 for GReg-1)."""
        return 0.0

    def lambda_pruned(self) -> float:
        """The penalty of the groups to prune."""
        return self.lambda_pick() + self.grows * self.delta_lambda

    def lambda_kept(self) -> float:
        """The penalty of the kept groups (GReg-2: -gamma once picked)."""
        return 0.0

    def planned_steps(self) -> int:
        """The regularisation stage's optimizer steps: until lambda passes tau, then K_s."""
        return (self._updates_to_tau() - 1) * self.update_interval + self.stabilize_steps

    def _updates_to_tau(self) -> int:
        return _updates_past(self.tau, self.delta_lambda)

    def _update(self, model: nn.Module) -> None:
        """One penalty update (Algorithm 1, lines 6-11), at iterations 0, K_u, 2 K_u, ..."""
        self.grows += 1
        self._after_growth(model)

    def _after_growth(self, model: nn.Module) -> None:
        cause = None
        if self.lambda_pruned() > self.tau:
            cause = f"lambda passed tau={self.tau:g}"
        elif self.ratio_limit is not None and self._ratios_reached(model):
            cause = f"every layer's kept/pruned magnitude ratio reached {self.ratio_limit:g}"
        if cause:
            self.phase = "stabilize"
            self.stable_from = self.iteration
            self.cause = cause
            log.info(
                "%s: %s at iteration %d; %d stabilisation steps follow",
                type(self).__name__,
                cause,
                self.iteration,
                self.stabilize_steps,
            )
        self._lambdas = {}
        self._record(model)

    def _ratios_reached(self, model: nn.Module) -> bool:
        """The official code's early end: each layer's kept/pruned mean |w| ratio, smoothed as it smooths
        it (0.9 old + 0.1 new at every update), is at least `ratio_limit`."""
        reached = True
        for group, weights in self._layers.items():
            kept, pruned = self.mean_magnitudes(model, weights)
            if pruned <= 0 and kept <= 0:
                continue
            ratio = kept / pruned if pruned > 0 else math.inf
            old = self.ratio_ema.get(group)
            self.ratio_ema[group] = ratio if old is None else 0.9 * old + 0.1 * ratio
            reached = reached and self.ratio_ema[group] >= self.ratio_limit
        return reached

    # ---- stages and hooks ---------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        optimizer = sgd(self.lr, self.momentum, self.weight_decay)
        scheduler = {"_target_": "prunelab.lit.constant", "_partial_": True}
        # The step limit is a safety net only: the stage ends on its condition after planned_steps().
        regularize = Stage(
            "regularize",
            "fit",
            epochs=-1,
            lr=self.lr,
            optimizer=optimizer,
            scheduler=scheduler,
            max_steps=self.planned_steps() + self.update_interval,
        )
        return [regularize, Stage("prune", "prune")]

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        """Before the regularisation: find the penalised layers, pick (GReg-1) and make the first update."""
        if stage.name != "regularize":
            return model
        self._ctx = ctx
        self._layers = self._candidate_layers(model, ctx)
        if not self._layers:
            raise ConfigError(f"{type(self).__name__.lower()}: the budget leaves no group to prune")
        self._reset()
        if not self.picks_late:
            self.selection = self._pick(model)
        self._update(model)  # Iteration 0 is an update iteration (i % K_u == 0).
        return model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """1/2 sum_j lambda_j ||w_j||^2 over the penalised groups."""
        if not self._layers:
            return None
        if not self._lambdas:
            self._lambdas = self._build_lambdas(model)
        total = None
        for name, lam in self._lambdas.items():
            weight = model.get_parameter(name)
            if lam.device != weight.device:
                lam = self._lambdas[name] = lam.to(weight.device)
            term = (lam * weight.pow(2)).sum()
            total = term if total is None else total + term
        return None if total is None else 0.5 * total

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if not self._layers:
            return
        self.iteration += 1
        if self.phase != "stabilize" and self.iteration % self.update_interval == 0:
            self._update(model)

    def should_stop(self, model: nn.Module, step: int) -> str | None:
        # Only the regularisation stage ends on the condition (not the fine-tuning after it).
        if self._layers and self.phase == "stabilize" and self.iteration - self.stable_from >= self.stabilize_steps:
            return f"{self.cause} at iteration {self.stable_from}, then {self.stabilize_steps} steps"
        return None

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        if not self._layers or not self.history:
            return {}
        last = self.history[-1]
        return {k: v for k, v in last.items() if k != "iteration"}

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """After the regularisation: write the penalty's record and the norm-ratio plot beside the run."""
        if stage.name == "regularize" and self._layers:
            self._record(model)
            if self._ctx is not None:
                write_json(self._ctx.run_dir / "greg_history.json", self.history, indent=None)
                plot_history(self.history, self._ctx.run_dir / "greg_norm_ratio.png", type(self).__name__, self.tau)
            self._layers, self._lambdas = {}, {}
        return model

    def plan(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan | MaskPlan:
        """The penalised groups go (the least L1 norms by far after the regularisation)."""
        if self.selection is None:
            raise RuntimeError(
                f"{type(self).__name__}: the prune stage found no selection (did the regularisation run?)"
            )
        if self.granularity == "weight":
            return MaskPlan({k: v.bool() for k, v in self.selection["masks"].items()})
        return ChannelPlan(self.selection["keep"], self.selection["sizes"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "phase": self.phase,
            "picks": self.picks,
            "grows": self.grows,
            "stable_from": self.stable_from,
            "cause": self.cause,
            "ratio_ema": dict(self.ratio_ema),
            "selection": self.selection,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.phase = state["phase"]
        self.picks = int(state["picks"])
        self.grows = int(state["grows"])
        self.stable_from = state["stable_from"]
        self.cause = state.get("cause", "")
        self.ratio_ema = dict(state.get("ratio_ema", {}))
        self.selection = state["selection"]
        self.history = list(state["history"])
        self._lambdas = {}

    # ---- groups, selection and lambdas --------------------------------------------------------

    def _candidate_layers(self, model: nn.Module, ctx: MethodContext) -> dict[str, list[str]]:
        """Group name -> the weights (parameter names) penalised for it; weights by name when unstructured.

        Groups that the layer ratios leave whole (ratio 0) are never penalised, as in the official code.
        """
        if self.granularity == "weight":
            self._sizes = {name: w.numel() for name, w in prunable_weights(model)}
            return {name: [name] for name in self._sizes}
        groups = prunable_groups(model, ctx)
        if ctx.budget.get("layer_ratios"):
            ratios = parse_layer_ratios(list(ctx.budget.layer_ratios), groups)
            groups = [g for g in groups if ratios.get(g.name, 0.0) > 0]
        self._groups = {g.name: g for g in groups}
        return {g.name: [f"{layer}.weight" for layer in g.layers] for g in groups}

    def _pick(self, model: nn.Module) -> dict[str, Any]:
        """The groups of least L1 norm under the experiment's budget, as one-shot L1 would choose them."""
        ctx = self._ctx
        if self.granularity == "weight":
            scores = {name: w.detach().abs().float().cpu() for name, w in prunable_weights(model)}
            masks = unstructured_plan(scores, float(ctx.budget.sparsity), ctx.budget.get("scope", "global")).masks
            return {"masks": {k: v.cpu() for k, v in masks.items()}}
        scores = {}
        for name, group in self._groups.items():
            norms = sum(w.detach().abs().flatten(1).sum(1) for w in group_weights(model, group))
            # Normalised per group as l1_filter does, so that a global threshold compares layers alike.
            scores[name] = (norms / norms.max().clamp_min(1e-12)).cpu()
        plan = structured_plan(model, scores, ctx)
        return {"keep": {k: list(v) for k, v in plan.keep.items()}, "sizes": dict(plan.sizes)}

    def _pruned_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per penalised weight, True where it belongs to a group to prune (shaped to broadcast)."""
        out = {}
        if self.granularity == "weight":
            for name, keep in self.selection["masks"].items():
                out[name] = ~keep.bool()
            return out
        for group, weights in self._layers.items():
            keep = self.selection["keep"].get(group)
            size = self.selection["sizes"].get(group, len(keep) if keep else 0)
            pruned = torch.ones(size, dtype=torch.bool)
            if keep is not None:
                pruned[torch.tensor(keep, dtype=torch.long)] = False
            else:
                pruned[:] = False
            for name in weights:
                w = model.get_parameter(name)
                out[name] = pruned.view(-1, *([1] * (w.dim() - 1)))
        return out

    def _build_lambdas(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """lambda per penalised weight element (broadcast views), from the phase and the selection."""
        lambdas = {}
        if self.selection is None:
            lam = self.lambda_pick()
            for weights in self._layers.values():
                for name in weights:
                    w = model.get_parameter(name)
                    lambdas[name] = torch.full((w.shape[0],) + (1,) * (w.dim() - 1), lam, device=w.device)
            return lambdas
        pruned_lam, kept_lam = self.lambda_pruned(), self.lambda_kept()
        for name, pruned in self._pruned_masks(model).items():
            w = model.get_parameter(name)
            lam = torch.where(pruned, torch.tensor(pruned_lam), torch.tensor(kept_lam)).float()
            if self.granularity == "filter" and kept_lam == 0 and not pruned.any():
                continue
            lambdas[name] = lam.to(w.device)
        return lambdas

    def _record(self, model: nn.Module) -> None:
        """One history entry per update: the iteration, lambda and the kept/pruned norm ratio."""
        entry = {
            "iteration": float(self.iteration),
            "lambda": self.lambda_pruned(),
            "lambda_kept": self.lambda_kept() if self.selection is not None else self.lambda_pick(),
        }
        # lambda's mean and max over the penalised groups (filters, or weights when unstructured).
        n_pruned, n_kept = self._group_counts()
        lams = (entry["lambda"], entry["lambda_kept"]) if self.selection is not None else (entry["lambda_kept"],) * 2
        entry["lambda_max"] = max(lams[0] if n_pruned else -math.inf, lams[1] if n_kept else -math.inf)
        entry["lambda_mean"] = (n_pruned * lams[0] + n_kept * lams[1]) / max(1, n_pruned + n_kept)
        if self.selection is not None:
            kept, pruned = self.mean_magnitudes(model)
            if pruned > 0 and math.isfinite(kept / pruned):
                entry.update(norm_ratio=kept / pruned, pruned_mean_abs=pruned, kept_mean_abs=kept)
        self.history.append(entry)

    def _group_counts(self) -> tuple[int, int]:
        """(groups to prune, kept groups) among the penalised ones; all count as kept before GReg-2 picks."""
        if self.granularity == "weight":
            if self.selection is None:
                return 0, sum(self._sizes.values())
            keep = self.selection["masks"]
            kept = sum(int(m.sum()) for m in keep.values())
            return sum(m.numel() for m in keep.values()) - kept, kept
        sizes = {g: self._groups[g].size for g in self._layers}
        if self.selection is None:
            return 0, sum(sizes.values())
        kept = sum(len(self.selection["keep"].get(g, range(n))) for g, n in sizes.items())
        return sum(sizes.values()) - kept, kept

    def mean_magnitudes(self, model: nn.Module, names: list[str] | None = None) -> tuple[float, float]:
        """Mean |w| of the kept groups' and of the pruned groups' weights (their ratio: the paper's gap),
        over all penalised weights or over those `names`."""
        kept_sum = kept_n = pruned_sum = pruned_n = 0.0
        with torch.no_grad():
            for name, pruned in self._pruned_masks(model).items():
                if names is not None and name not in names:
                    continue
                w = model.get_parameter(name).detach().abs()
                mask = pruned.to(w.device).expand_as(w)
                pruned_sum += float(w[mask].sum())
                pruned_n += float(mask.sum())
                kept_sum += float(w[~mask].sum())
                kept_n += float((~mask).sum())
        return (kept_sum / kept_n if kept_n else 0.0), (pruned_sum / pruned_n if pruned_n else 0.0)


class GReg1(GrowingRegularization):
    """GReg-1: the pruning schedule. L1-picked groups get a penalty growing to tau; kept groups none."""


class GReg2(GrowingRegularization):
    """GReg-2: the importance criterion. All candidates grow to tau0, then L1 picks; kept groups get -gamma."""

    picks_late = True

    def __init__(self, tau0: float = 0.01, delta_lambda_pick: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__.lower()
        if not (isinstance(delta_lambda_pick, (int, float)) and delta_lambda_pick > 0):
            raise ConfigError(f"{name}: method.delta_lambda_pick={delta_lambda_pick!r} must be a number > 0")
        if not (isinstance(tau0, (int, float)) and 0 < tau0 < self.tau):
            raise ConfigError(f"{name}: method.tau0={tau0!r} must be in (0, tau={self.tau:g}) (the picking ceiling)")
        self.tau0 = float(tau0)
        self.delta_lambda_pick = float(delta_lambda_pick)

    def lambda_pick(self) -> float:
        return self.picks * self.delta_lambda_pick

    def lambda_kept(self) -> float:
        return -self.weight_decay

    def _picks_to_tau0(self) -> int:
        return _updates_past(self.tau0, self.delta_lambda_pick)

    def _updates_to_tau(self) -> int:
        # Picking updates until lambda passes tau0, then one update that picks and grows, then growth.
        picks = self._picks_to_tau0()
        return picks + _updates_past(self.tau, self.delta_lambda, start=picks * self.delta_lambda_pick)

    def _update(self, model: nn.Module) -> None:
        # Algorithm 1, line 7: once lambda passed tau0 (checked before this update's increment), pick.
        if self.phase == "pick" and self.lambda_pick() > self.tau0:
            self.selection = self._pick(model)
            self.phase = "grow"
            log.info(
                "GReg2: picked the groups to prune at iteration %d (lambda %.6g > tau0=%g)",
                self.iteration,
                self.lambda_pick(),
                self.tau0,
            )
        if self.phase == "pick":
            self.picks += 1
            self._lambdas = {}
            self._record(model)
            return
        self.grows += 1
        self._after_growth(model)


def plot_history(history: list[dict[str, float]], path, title: str, tau: float) -> None:
    """lambda and the kept/pruned norm ratio against iterations (log scales), the paper's Fig. 1 argument."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ratio = [(h["iteration"], h["norm_ratio"]) for h in history if "norm_ratio" in h and math.isfinite(h["norm_ratio"])]
    if ratio:
        ax.plot([r[0] for r in ratio], [r[1] for r in ratio], color="tab:blue", label="kept / pruned mean |w|")
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("norm ratio (kept / pruned)", color="tab:blue")
    other = ax.twinx()
    other.plot(its, [h["lambda"] for h in history], color="tab:red", label="lambda (pruned)")
    other.axhline(tau, color="tab:red", linestyle=":", linewidth=0.8)
    other.set_ylabel("lambda", color="tab:red")
    ax.set_title(f"{title}: growing regularisation")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
