"""Greedy local and global imitation (Ye, Wu & Liu, "Greedy Optimization Provably Wins the Lottery").

A layer of N neurons is F_l(z) = (1/N) sum_i sigma_i(z); pruning replaces it by f_A(z) = sum_i a_i sigma_i(z)
with A on the probability simplex and few non-zero a_i. Here a neuron is one channel of a channel group
as the layer that reads it sees it (its input channel i after the group's BatchNorm and activation), and
sigma_i is that channel's contribution to the reading layer (the consumer): c_i = W[:, i] * x_i. With
u = N a, the pruned consumer computes sum_i u_i c_i, so the a_i fold into its input weights (W[:, i] *= N a_i)
and the channels with a_i = 0 are removed physically by the ChannelPlan: the dense layer is u = 1.

Local imitation (eqs. 3-4) minimises the consumer's output discrepancy E||f_A - F_l||^2 greedily: it starts
from the best single neuron, then each step moves A to (1 - g) A + g e_i for the neuron i and step g in
U_i that lower the discrepancy most, which adds (a_i = 0), re-weights, or removes neuron i (g at the lower
end of U_i = [-a_i / (1 - a_i), 1]). Derivation of the closed form (the paper's lost Appendix 5.1): with
G_jk = E<c_j, c_k> over the mini-batch (one forward pass gives G, and G serves every candidate),
r = f_A - F_l has coefficients (u - 1) over the c's and d_i = N c_i - f_A has (N e_i - u), and

    D(g) = E||r + g d_i||^2 = D(0) + 2 g b_i + g^2 q_i,
    b_i = E<r, d_i> = N [G (u - 1)]_i - (u - 1)^T G u,      q_i = E||d_i||^2 = N^2 G_ii - 2 N [G u]_i + u^T G u,

a parabola in g with minimum at g_i = -b_i / q_i; clipped to U_i (the parabola is convex, so the
clipped value is the constrained minimum) it gives the decrease -(2 g_i b_i + g_i^2 q_i) of every candidate.

Global imitation (eqs. 6-8) scores a candidate by the network's final discrepancy D to the network before
this layer was pruned (cross-entropy between their outputs, Section 3.1), with the fixed step
g_k = 1 / (1 + k): every candidate costs one forward pass. The Taylor speed-up (Section 2.2.1) after
`taylor_after` steps ranks candidates by dD/dg at g = 0 and evaluates only the `taylor_top` best exactly.
The derivative comes from autograd through ancillary per-channel scales s (the consumer reads s_j x_j,
s = u; the paper's Appendix 5.4): along the candidate's direction u(g) = N((1 - g) a + g e_i),
dD/dg = N (dD/ds_i - a^T dD/ds), so one backward pass scores all N candidates (the most negative is best;
the paper's "largest gr" reads with the opposite sign convention).

Algorithm 2 prunes the groups from the input to the output, each by local and by global imitation with
the same stopping rule, keeping the one that keeps fewer neurons (on a tie, the smaller discrepancy).
`discrepancy` in the per-layer record is the network's (the soft cross-entropy to the network before
the layer was pruned) for both imitations, so the tie-break compares like with like. The stopping
rule (Section 3.2): the cross-entropy training loss of the network after pruning the layer exceeds the
one before by at most `epsilon`, on the step's mini-batch. We measure the gap per layer (the
network before this layer's pruning is the reference), so that every layer gets the same tolerance.
Mini-batches come from the training split only. Groups coupled by residual additions are kept whole
(folding a_i there would also scale the identity path); channels gated by squeeze-excitation fold into
the gate's first layer too. For such channels local imitation imitates the main consumer's input as the
dense gate scales it (the gate's change is seen by the network-level check only). `mode` runs local,
global or both.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress, TextColumn
from torch import nn

from prunelab.budget import BudgetError, CostModel, budget_latency, deployed_latency, keep_count, measure
from prunelab.io import write_json
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.methods.greedy_budget import Layer, Trajectory, aim, complete, plan_of
from prunelab.methods.greedy_plots import plot_layers, plot_study
from prunelab.methods.greedy_steps import (
    Scales,
    best_per_count,
    fold,
    gram_of,
    local_discrepancy,
    local_step,
    move,
    soft_ce,
    taylor_scores,
)
from prunelab.structure import ChannelGroup, ChannelPlan, apply_channel_plan, channel_groups
from prunelab.structure.groups import eval_mode, grouped_unit
from prunelab.validate import ConfigError

log = logging.getLogger("prunelab")

MODES = ("local", "global", "both")


class GreedyImitation(PruningMethod):
    """Layer-wise greedy local / global imitation (Algorithm 2) with the epsilon stopping rule.

    `epsilon`: tolerated rise of the training cross-entropy per pruned layer (searched when the budget
    sets `flops`, `params` or `latency`, see `_search`; `search_iterations` caps its passes). `mode`: local, global or
    both (per layer the one that keeps fewer neurons). `max_steps`: safety cap of steps per layer and
    method, as a multiple of the layer's width (a method that has not met the rule by then leaves the
    layer whole). `taylor_after` / `taylor_top`: the Taylor speed-up of global imitation (null: off).
    """

    needs_training_data = True

    def __init__(
        self,
        epsilon: float = 0.05,
        mode: str = "both",
        max_steps: float = 2.0,
        taylor_after: int | None = None,
        taylor_top: int = 5,
        search_iterations: int = 8,
        study: bool = False,
        study_steps: float = 1.0,
        batch_size: int | None = None,
    ) -> None:
        if not epsilon >= 0:
            raise ConfigError(
                f"greedy: method.epsilon (tolerated rise of the training loss) must be >= 0; got {epsilon}"
            )
        if mode not in MODES:
            raise ConfigError(f"greedy: method.mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not max_steps > 0:
            raise ConfigError(f"greedy: method.max_steps (per layer, times its width) must be > 0; got {max_steps}")
        if taylor_after is not None and (taylor_after < 0 or taylor_top < 1):
            raise ConfigError(
                f"greedy: method.taylor_after must be >= 0 and taylor_top >= 1; got {taylor_after}, {taylor_top}"
            )
        self.epsilon = float(epsilon)
        self.mode = mode
        self.max_steps = float(max_steps)
        self.taylor_after = taylor_after
        self.taylor_top = int(taylor_top)
        if int(search_iterations) < 1:
            raise ConfigError(f"greedy: method.search_iterations must be >= 1; got {search_iterations}")
        self.search_iterations = int(search_iterations)
        self.study = bool(study)
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"greedy: method.batch_size must be >= 1 (null: the dataset's); got {batch_size}")
        self.batch_size = int(batch_size) if batch_size is not None else None
        self.study_steps = float(study_steps)
        self.records: list[dict[str, Any]] = []
        self.passes = 0  # layer-wise passes run (every one a full Algorithm 2)

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def bind(self, ctx: MethodContext) -> None:
        if not ctx.pretrained:
            log.warning("greedy imitation prunes a PRETRAINED network, but backbone.pretrained is not set")

    def plan(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan:
        """Prune the groups from the input to the output; fold each layer's a_i into its consumer.

        With `budget.flops` (or `budget.params`, `budget.latency`), epsilon is searched instead in about two
        layer-wise passes that record every layer's steps (`_search`).
        """
        start = time.perf_counter()
        ctx.data.setup("fit")
        if self.study:
            return self._study(model, ctx)
        metric = next((m for m in ("flops", "params", "latency") if ctx.budget.get(m) is not None), None)
        trials: list[dict[str, float]] = []
        search: dict[str, Any] = {}
        if metric is None:
            plan, records, _ = self._layerwise(model, ctx, self.epsilon)
        else:
            plan, records = self._search(model, ctx, metric, float(ctx.budget[metric]), trials, search)
        self.records = records
        write_json(
            ctx.run_dir / "greedy_layers.json",
            {
                "seconds": time.perf_counter() - start,
                "epsilon_trials": trials,
                **({"budget_search": search} if search else {}),
                "layers": records,
            },
        )
        plot_layers(records, ctx.run_dir / "greedy_layers.png")
        return plan

    def _study(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan:
        """The paper's Fig. 2: every layer pruned ALONE from the dense model by local and by global imitation.

        Each runs `study_steps` x the layer's width steps without the stopping rule; the curve of a layer
        is the smallest network discrepancy (soft cross-entropy to the dense model) reached with at most
        n neurons, for every n. Written to `greedy_study.json` and `greedy_study.png`; nothing is pruned.
        """
        groups = self._groups(model, ctx)
        device = next(model.parameters()).device
        curves = []
        with eval_mode(model), Progress(*Progress.get_default_columns(), TextColumn("{task.fields[last]}")) as bar:
            task = bar.add_task("greedy imitation study, layer by layer", total=len(groups), last="")
            for index, (group, consumers) in enumerate(groups):
                hook = Scales([model.get_submodule(c) for c in consumers])
                steps = max(1, int(self.study_steps * group.size))
                try:
                    runs = {
                        ("local" if local else "global"): self._imitate(
                            model,
                            hook,
                            group.size,
                            _batches(ctx.data, ctx.seed * 1000 + index, device, self.batch_size),
                            steps,
                            -math.inf,
                            local,
                        ).history()
                        for local in (True, False)
                    }
                finally:
                    hook.remove()
                curves.append(
                    {
                        "group": group.name,
                        "size": group.size,
                        **{name: best_per_count(history, group.size) for name, history in runs.items()},
                    }
                )
                bar.update(task, advance=1, last=group.name)
        write_json(ctx.run_dir / "greedy_study.json", curves)
        plot_study(curves, ctx.run_dir / "greedy_study.png")
        return ChannelPlan.full([g for g, _ in groups])

    def _layerwise(
        self,
        model: nn.Module,
        ctx: MethodContext,
        epsilon: float,
        record_to: float | None = None,
        limits: dict[str, int] | None = None,
    ) -> tuple[ChannelPlan, list[dict[str, Any]], list[Layer]]:
        """Algorithm 2 at one epsilon, folding into `model` in place; each layer's steps are recorded down to
        `record_to` (default: epsilon), past the stop where lower (see `greedy_budget`), or to `limits[group]` steps."""
        groups = self._groups(model, ctx)
        records, layers = [], []
        device = next(model.parameters()).device
        self.passes += 1
        with eval_mode(model), Progress(*Progress.get_default_columns(), TextColumn("{task.fields[last]}")) as bar:
            task = bar.add_task(f"greedy imitation, epsilon {epsilon:.4g}", total=len(groups), last="")
            for index, (group, consumers) in enumerate(groups):
                found, layer = self._prune_group(
                    model,
                    group,
                    consumers,
                    # B023: _prune_group calls it before this iteration ends.
                    lambda: _batches(ctx.data, ctx.seed * 1000 + index, device, self.batch_size),  # noqa: B023
                    epsilon,
                    int(ctx.budget.get("round_to") or 1),
                    record_to,
                    (limits or {}).get(group.name),
                )
                records.append({k: v for k, v in found.items() if k != "a"})
                layers.append(layer)
                kept = f"{group.name}: {len(found['keep'])}/{group.size} ({found['method']})"
                bar.update(task, advance=1, last=kept)
                log.info(
                    "greedy: %s, discrepancy %.4g, gap %.4g, %d steps",
                    kept,
                    found["discrepancy"],
                    found["gap"],
                    found["steps"],
                )
        plan, _ = plan_of(layers, [epsilon] * len(layers))
        return plan, records, layers

    def _search(
        self,
        model: nn.Module,
        ctx: MethodContext,
        metric: str,
        target: float,
        trials: list[dict[str, float]],
        search: dict[str, Any],
    ) -> tuple[ChannelPlan, list[dict[str, Any]]]:
        """A pruned model within `budget.tolerance` of `target` (a fraction of the dense model's `metric`), folded into
        `model`, in about two layer-wise passes.

        Pass 1 runs at `epsilon`; the `CostModel` estimates from its recording the plan of every larger epsilon, and
        pass 2 runs at the one estimated closest to the target, recording each layer down to an epsilon estimated
        halfway back to pass 1's ratio. Where pass 1 keeps less than the budget, it is first repeated recording every
        layer to twice its steps, at least its width (a third pass, the longest). Where the aimed pass misses the band,
        it is completed along its own recording (`greedy_budget.complete`), else the pass it was aimed from is.
        `search_iterations` caps the passes (1: pass 1 completed). A latency is measured on the built plans, estimated
        in between as their measured share of the FLOPs. Fails only where no recorded plan meets the budget, naming the
        closest.
        """
        if not 0.0 < target <= 1.0:
            raise BudgetError(f"budget.{metric} is the fraction to keep, in (0, 1]; got {target}")
        tolerance = float(ctx.budget.get("latency_tolerance" if metric == "latency" else "tolerance", 0.01))
        low, high = target * (1 - tolerance), target * (1 + tolerance)
        began = time.perf_counter()
        round_to = int(ctx.budget.get("round_to") or 1)
        groups = [g for g, _ in self._groups(model, ctx)]
        proxy = "flops" if metric == "latency" else metric
        costs = CostModel(model, channel_groups(model, ctx.input_shape), ctx.input_shape)
        scale = 1.0  # measured over estimated, of the last plan built (for a latency: its share of the FLOPs)
        closest: list[float] = []

        def raw(plan: ChannelPlan) -> float:
            return costs.count(plan)[proxy] / costs.dense[proxy]

        def estimated(plan: ChannelPlan) -> float:
            return raw(plan) * scale

        def measured(plan: ChannelPlan) -> float:
            nonlocal scale
            pruned = apply_channel_plan(copy.deepcopy(model), plan, ctx.input_shape)
            if metric == "latency":
                ratio = deployed_latency(pruned, ctx.input_shape, **budget_latency(ctx.budget)) / ctx.dense[metric]
            else:
                ratio = measure(pruned, ctx.input_shape)[metric] / ctx.dense[metric]
            scale = ratio / raw(plan)
            closest.append(ratio)
            return ratio

        smallest = ChannelPlan(
            {g.name: list(range(keep_count(1, g.size, round_to))) for g in groups}, {g.name: g.size for g in groups}
        )
        if metric != "latency" and measured(smallest) > high:
            raise BudgetError(
                f"greedy: budget.{metric}={target} cannot be met: one neuron (round_to={round_to}) in every layer "
                f"greedy prunes still keeps {closest[-1]:.4f} of the dense {metric} (the closest plan; residual "
                "streams are kept whole)"
            )

        def run(epsilon: float, record_to: float, limits: dict[str, int] | None = None) -> tuple[float, list[Layer]]:
            start = time.perf_counter()
            plan, records, layers = self._layerwise(copy.deepcopy(model), ctx, epsilon, record_to, limits)
            ratio = measured(plan)
            trials.append(
                {
                    "epsilon": epsilon,
                    "record_to": record_to if math.isfinite(record_to) else None,
                    f"{metric}_ratio": ratio,
                    "steps": sum(r["steps"] for r in records),
                    "recorded_steps": sum(len(t.gaps) for x in layers for t in x.tries),
                    "seconds": time.perf_counter() - start,
                }
            )
            log.info(
                "greedy: pass %d at epsilon %.4g (recorded down to %.4g) keeps %.4f of the dense %s (target %.4f), "
                "%.0f s",
                len(trials),
                epsilon,
                record_to,
                ratio,
                metric,
                target,
                trials[-1]["seconds"],
            )
            return ratio, layers

        epsilon = max(self.epsilon, 1e-3)
        ratio, layers = run(epsilon, epsilon)
        if ratio < low and len(trials) < self.search_iterations:
            # Under budget, and nothing below epsilon was recorded: pass 1 again, recording every layer to twice its
            # steps and at least its width (a step adds one neuron at most) or max_steps, which knows smaller epsilons.
            ratio, layers = run(
                epsilon, -math.inf, {x.group: max(x.size, 2 * max(len(t.gaps) for t in x.tries)) for x in layers}
            )
        epsilons, moves, estimate = [epsilon] * len(layers), 0, ratio
        if not low <= ratio <= high:
            first, first_epsilon, first_pass = layers, epsilon, len(trials)
            if len(trials) < self.search_iterations:
                # Recorded down to an epsilon estimated halfway back to this pass's ratio (just above the band when
                # under).
                mid = target + max(ratio - target, 6 * tolerance * target) / 2
                epsilon, guess, record_to = aim(layers, target, mid, estimated)
                log.info(
                    "greedy: pass %d's recording puts epsilon %.4g at %.4f of the dense %s",
                    len(trials),
                    epsilon,
                    guess,
                    metric,
                )
                ratio, layers = run(epsilon, record_to)
                epsilons, estimate = [epsilon] * len(layers), ratio
            if not low <= ratio <= high:
                # Deviation from the paper: a layer moved here keeps the later layers as imitated with its stop in
                # the pass (not re-imitated behind its new one); fine-tuning absorbs the difference.
                epsilons, estimate, moves = complete(layers, epsilons, target, tolerance, estimated)
                if not low <= estimate <= high and first is not layers:
                    closest.append(estimate)
                    log.info(
                        "greedy: pass %d cannot be completed to the budget (%.4f); pass %d is",
                        len(trials),
                        estimate,
                        first_pass,
                    )
                    layers, epsilon = first, first_epsilon
                    epsilons, estimate, moves = complete(layers, [epsilon] * len(layers), target, tolerance, estimated)
        plan, found = plan_of(layers, epsilons)
        for _ in range(3):  # The estimate checked on the built plan (a latency, or costs the CostModel takes as fixed).
            if low <= estimate <= high and low <= (ratio := measured(plan)) <= high:
                break
            epsilons, estimate, more = complete(layers, epsilons, target, tolerance, estimated)
            moves += more
            plan, found = plan_of(layers, epsilons)
        else:
            best = min(closest, key=lambda r: abs(r - target))
            raise BudgetError(
                f"greedy: no plan read from {len(trials)} recorded passes brings the {metric} ratio within "
                f"{tolerance:.2%} of {target} (the closest: {best:.4f}); raise budget.tolerance (or "
                "method.search_iterations, where every pass kept less than the budget)"
            )
        for layer, choice in zip(layers, found):
            fold([model.get_submodule(c) for c in layer.consumers], choice["a"])
        passed = plan_of(layers, [epsilon] * len(layers))[1]
        channels = sum(abs(len(f["keep"]) - len(p["keep"])) for f, p in zip(found, passed))
        search.update(
            {
                "passes": len(trials),
                "completion_moves": moves,
                "completion_channels": channels,
                f"{metric}_ratio": ratio,
                "seconds": time.perf_counter() - began,
            }
        )
        log.info(
            "greedy: budget %s %s met at %.4f in %d passes (+ completion of %d channels), %.0f s",
            metric,
            target,
            ratio,
            len(trials),
            channels,
            search["seconds"],
        )
        return plan, [{k: v for k, v in f.items() if k != "a"} for f in found]

    @staticmethod
    def _consumers(model: nn.Module, group: ChannelGroup, groups: list[ChannelGroup]) -> list[str] | None:
        """The layers to fold the group's a_i into, the imitated one first; None where greedy keeps it whole.

        Supported: one consumer, or one plus squeeze-excitation gates: channels merged by products only
        (no addition) where a consumer's own output group is read by the layer that also writes them
        (MobileNetV3's fc1 -> fc2, whose output multiplies the channels). Folding a_i into every consumer
        is exact (every reader of the channels is a consumer). Residual streams (channels merged by an
        addition) are kept whole, by policy (see the module docstring), like grouped consumers.
        """
        if group.unit != 1 or group.tied or any(op.startswith(("Add", "Sub")) for op in group.merges):
            return None
        extra = {name for name in group.layers[1:] if grouped_unit(model.get_submodule(name)) is None}
        rooted = {g.name: g for g in groups}
        gates = [c for c in group.consumers if c in rooted and extra & set(rooted[c].consumers)]
        main = [c for c in group.consumers if c not in gates]
        if len(main) != 1 or extra - {r for c in gates for r in rooted[c].consumers}:
            return None
        for name in group.consumers:
            consumer = model.get_submodule(name)
            width = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
            if width != group.size or getattr(consumer, "groups", 1) != 1:
                return None
        return main + gates

    def _groups(self, model: nn.Module, ctx: MethodContext) -> list[tuple[ChannelGroup, list[str]]]:
        """The groups greedy prunes, input to output, with their consumers (see `_consumers`)."""
        groups = channel_groups(model, ctx.input_shape)
        roles = [(g, self._consumers(model, g, groups)) for g in groups]
        return [(g, c) for g, c in roles if c is not None]

    def _prune_group(
        self,
        model: nn.Module,
        group: ChannelGroup,
        consumers: list[str],
        batches: Any,
        epsilon: float,
        round_to: int = 1,
        record_to: float | None = None,
        limit: int | None = None,
    ) -> tuple[dict[str, Any], Layer]:
        """Both imitations of one group (as `mode` says) on the same mini-batches, recorded down to `record_to` (or
        `limit` steps); the choice at `epsilon` folded into the consumers. Returns the choice and the recorded Layer."""
        n = group.size
        steps = max(1, int(self.max_steps * n))
        hook = Scales([model.get_submodule(c) for c in consumers])
        try:
            tries = [
                self._imitate(model, hook, n, batches(), steps, epsilon, local, record_to, limit)
                for local in (True, False)
                if self.mode in (("local", "both") if local else ("global", "both"))
            ]
        finally:
            hook.remove()
        priority = hook.consumers[0].weight.detach().abs().transpose(0, 1).reshape(n, -1).sum(1).cpu()
        layer = Layer(group.name, n, consumers, tries, priority, round_to)
        found = layer.found(epsilon)
        fold(hook.consumers, found["a"])
        return found, layer

    def _imitate(
        self,
        model: nn.Module,
        hook: Scales,
        n: int,
        batches: Iterator,
        steps: int,
        epsilon: float,
        local: bool,
        record_to: float | None = None,
        limit: int | None = None,
    ) -> Trajectory:
        """Algorithm 1 for one layer, recorded step by step until the loss gap is at most `epsilon` (or `record_to`
        where lower), or `steps` (or the recording's `limit`) ran out; `Trajectory.found(epsilon)` is the run that
        stops at epsilon."""
        device = next(model.parameters()).device
        until = epsilon if record_to is None else min(epsilon, record_to)
        trajectory = Trajectory("local" if local else "global", n)
        a = torch.zeros(n, dtype=torch.float64, device=device)
        gap = layer_discrepancy = math.inf
        for k, (x, y) in enumerate(batches):
            with torch.no_grad():
                hook.u, hook.capture = None, local
                reference = model(x)
                hook.capture = False
                base = float(F.cross_entropy(reference, y))
            if local:
                gram = gram_of(hook.consumer, hook.captured)
                hook.captured = None
                if k == 0:
                    i = int(torch.argmin(n * n * torch.diagonal(gram) - 2 * n * gram.sum(dim=1)))
                    a[i] = 1.0
                else:
                    i, g, _ = local_step(gram, n * a, a > 0)
                    a = move(a, i, g)
                layer_discrepancy = local_discrepancy(gram, n * a)
                with torch.no_grad():
                    hook.u = (n * a).float()
                    logits = model(x)
                discrepancy = float(soft_ce(logits, reference))
            else:
                a, discrepancy, logits = self._global_step(model, hook, a, k, x, reference)
            gap = float(F.cross_entropy(logits, y)) - base
            trajectory.add(a, gap, discrepancy, layer_discrepancy if local else None)
            if gap <= until or k + 1 >= min(steps, limit or steps):
                break
        hook.u = None
        trajectory.capped = len(trajectory.gaps) >= steps
        return trajectory

    def _global_step(
        self, model: nn.Module, hook: Scales, a: torch.Tensor, k: int, x: torch.Tensor, reference: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Step (8) (or (6) at k = 0): the new A, its discrepancy and the network's logits with it."""
        n = a.numel()
        if k == 0:
            candidates = list(range(n))
            directions = [torch.eye(n, dtype=a.dtype, device=a.device)[i] for i in candidates]
        else:
            gamma = 1.0 / (1 + k)
            candidates = list(range(n))
            if self.taylor_after is not None and k > self.taylor_after:
                # Most negative dD/dg first (one backward pass scores every candidate).
                candidates = taylor_scores(model, hook, a, x, reference).argsort().tolist()[: self.taylor_top]
            directions = [(1 - gamma) * a + gamma * torch.eye(n, dtype=a.dtype, device=a.device)[i] for i in candidates]
        best, best_d, best_logits = None, math.inf, None
        with torch.no_grad():
            for direction in directions:
                hook.u = (n * direction).float()
                logits = model(x)
                d = float(soft_ce(logits, reference))
                if d < best_d:
                    best, best_d, best_logits = direction, d, logits
        return best, best_d, best_logits


def _batches(
    data: Any, seed: int, device: torch.device, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training mini-batches without end, in an order fixed by `seed` (`batch_size` None: the dataset's)."""
    epoch = 0
    while True:
        loader = data.train_dataloader(epoch=seed + epoch, batch_size=batch_size)
        for x, y in loader:
            yield x.to(device), y.to(device)
        epoch += 1
