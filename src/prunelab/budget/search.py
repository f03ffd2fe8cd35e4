"""Searching a plan to a budget: a global threshold bisected to a FLOPs, parameter or latency target, and completion."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from prunelab.budget.cost import CostModel
from prunelab.budget.counting import count_flops, count_params
from prunelab.budget.latency import LatencyModel
from prunelab.budget.plans import (
    parse_layer_ratios,
    plan_by_counts,
    plan_by_threshold,
    tie_scores,
    unit_scores,
)
from prunelab.errors import BudgetError
from prunelab.structure import apply_channel_plan, channel_groups
from prunelab.structure.channel_group import keep_count

log = logging.getLogger(__name__)


def search_threshold(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    target: float,
    input_shape: tuple[int, ...],
    metric: str = "flops",
    tolerance: float = 0.01,
    iterations: int = 30,
    round_to: int = 1,
    reference: float | None = None,
    units: dict[str, int] | None = None,
    multiples: dict[str, int] | None = None,
    latency: dict | None = None,
    blocks: dict[str, int] | None = None,
):
    """Binary search of a global threshold on normalised scores to keep `target` of the dense FLOPs.

    Pruning from Scratch, Algorithm 1: tau in [0, 1] over scores divided by their global maximum, T
    iterations, stop when |C_t - C| / C <= epsilon. Candidates are counted from the plan by a
    `CostModel` (no model is built per step); the plan found is then applied to a copy of the model
    and counted there, and where the two differ (layers the cost model takes as fixed) the search
    runs again on a target corrected by their ratio, at most four times. The paper's extracted text
    swaps the bound update; we raise tau_min when the candidate is still too large, which is the
    convergent direction. The ratio is taken against `reference` (the dense backbone's count) when
    given, else against the model itself. Groups read by grouped convolutions keep whole units
    (`units`, group name to `ChannelGroup.unit`), and groups in `multiples` multiples of their
    count (`ChannelGroup.multiple`); both are read from the model when not given. Returns the plan and the ratio it
    achieves, as counted on the built model. Metric "latency" estimates candidates with a `LatencyModel` (built with
    the `latency` keyword arguments: batch_size, device, format, cache_dir, timer, rounds) and judges the
    built model by its timing beside the dense model (`_search_latency`). Its `ranking` "per_ms" ranks channels by
    score per millisecond of their group (`LatencyModel.channel_costs`: the greedy solution of HALP's latency knapsack,
    one cost per group), "importance" (default) by score alone, as the FLOPs search does. Per millisecond needs scores
    on one
    scale across groups (a loss change, as HALP's Taylor scores): with filter-L1 on a pretrained ResNet-56
    it cut two residual streams to one channel (residual streams are read by every block of their stage,
    so each of their channels costs the most) and fine-tuning did not recover (10% accuracy; measured).
    """
    import copy

    groups = [g for g in channel_groups(model, input_shape) if g.name in scores]
    scores = tie_scores(scores, groups)
    if units is None:
        units = {g.name: g.unit for g in groups}
    if multiples is None:
        multiples = {g.name: g.multiple for g in groups}
    if blocks is None:
        blocks = {g.name: g.blocks for g in groups}
    if metric == "latency":
        latency = dict(latency or {})
        ranking = latency.pop("ranking", "importance")
        costs = LatencyModel(model, groups, input_shape, round_to=round_to, **latency)
        if ranking == "per_ms":
            # HALP's knapsack, solved greedily: channels ranked by importance per millisecond they cost.
            per_channel = costs.channel_costs(groups)
            scores = {n: s / per_channel[n] for n, s in scores.items()}
    else:
        costs = CostModel(model, groups, input_shape)
        count = count_flops if metric == "flops" else (lambda m, _: count_params(m))
    dense = reference if reference is not None else costs.dense[metric]
    top = max(float(s.max()) for s in scores.values())
    normalised = {n: s.detach().float().cpu() / (top if top > 0 else 1.0) for n, s in scores.items()}

    def estimated(plan) -> float:
        return costs.count(plan)[metric] / dense

    if metric == "latency":
        return _search_latency(
            model,
            costs,
            normalised,
            target,
            input_shape,
            tolerance,
            iterations,
            round_to,
            units,
            multiples,
            blocks,
            dense,
        )
    smallest = estimated(plan_by_threshold(normalised, float("inf"), round_to, units, multiples, blocks))
    if smallest > target * (1 + tolerance):
        raise BudgetError(
            f"{metric} budget {target:.4g} cannot be met: keeping a single channel or unit (round_to={round_to}) in "
            f"every prunable group still leaves {smallest:.4g} of the dense {metric}"
        )
    aim = target
    for _ in range(5):
        plan = _bisect(
            normalised, aim, estimated, tolerance * target / aim, iterations, round_to, units, multiples, blocks, metric
        )
        value = count(apply_channel_plan(copy.deepcopy(model), plan, input_shape), input_shape)
        ratio = value / dense
        if abs(ratio - target) / target <= tolerance:
            return plan, ratio
        # The cost model missed a cost that changes with channels: aim where the built model lands on target.
        aim *= target / ratio
    raise BudgetError(
        f"the {metric} of the built model ({ratio:.4g}) stays off the target {target:.4g} by more than "
        f"{tolerance:.2%} after correcting the searched target 4 times; raise budget.tolerance"
    )


def _search_latency(
    model, costs, normalised, target, input_shape, tolerance, iterations, round_to, units, multiples, blocks, dense
):
    """The latency branch of `search_threshold`: a candidate bisected on the estimate is built and judged by its own
    measurement beside the dense model (`LatencyModel.judge`: the median of interleaved rounds' ratios, re-timed while
    unclear, up to a bound), six candidates at most.

    The measurement decides, not the estimate. The estimate can be off for the plans the scores make, and not by
    noise alone: the calibration times uniform widths, and a runtime whose kernels favour some channel counts runs a
    plan of uneven counts slower (ResNet-56 at batch 64 in ONNX: threshold plans estimated at 0.48-0.52 ran at
    0.61-0.66). So after a miss the next candidate is bisected to the estimate at which the measurements put the
    target (`_aim`); where the bisection finds a plan measured already, the plan of the bisection closest to the aim
    that was not measured yet is measured instead. A budget is refused as out of reach only once the smallest plan
    (one channel or unit a group) was measured over it. Against a `reference` the candidate is still timed beside
    the model the search started from, whose latency is a known fraction of it.
    """
    import copy
    import time

    # A ratio beside the search's own model, as a fraction of `dense` (1 when that model is the reference).
    scale = costs.dense["latency"] / dense
    low, high = target * (1 - tolerance) / scale, target * (1 + tolerance) / scale
    tried: list = []
    measured: dict = {}  # plan key -> (estimate, Beside)
    began = time.perf_counter()

    def estimated(plan) -> float:
        ratio = costs.count(plan)["latency"] / dense
        tried.append((plan, ratio))
        return ratio

    def noise() -> str:
        spreads = [b.spread for _, b in measured.values()]
        quality = "noisy: above" if max(spreads) > tolerance else "quiet enough: within"
        span = f"{min(spreads):.1%}-{max(spreads):.1%}" if len(spreads) > 1 else f"{spreads[0]:.1%}"
        return f"round-to-round spread {span} (machine {quality} the {tolerance:.2%} tolerance)"

    def judged(plan, name: str) -> float | None:
        # Built, timed beside the dense model until clear, logged; the ratio (a fraction of `dense`) when accepted.
        guess = costs.count(plan)["latency"] / dense
        beside = costs.judge(apply_channel_plan(copy.deepcopy(model), plan, input_shape), low, high)
        measured[_plan_key(plan)] = (guess, beside)
        accepted = low <= beside.ratio <= high
        log.info(
            "latency search, %s (estimated %.4f): %s beside the dense model, round-to-round spread %.1f%%; %s",
            name,
            guess,
            beside.describe(),
            100 * beside.spread,
            "accepted" if accepted else f"off the target {target:.4g} by more than {tolerance:.2%}",
        )
        if accepted:
            log.info(
                "latency search: %d plan(s) measured in %.0f s, %s", len(measured), time.perf_counter() - began, noise()
            )
        return beside.ratio * scale if accepted else None

    smallest = plan_by_threshold(normalised, float("inf"), round_to, units, multiples, blocks)
    if costs.count(smallest)["latency"] / dense > target * (1 + tolerance):
        ratio = judged(smallest, "the smallest plan (one channel or unit a group)")
        if ratio is not None:
            return smallest, ratio
        beside = measured[_plan_key(smallest)][1]
        if beside.ratio > high:
            raise BudgetError(
                f"latency budget {target:.4g} cannot be met: keeping a single channel or unit (round_to={round_to}) in "
                f"every prunable group still runs at {beside.ratio * scale:.4f} of the dense latency (median of "
                f"{beside.rounds} interleaved rounds beside the dense model, {noise()})"
            )
    # The estimate to bisect to, and the measured ratio's slope over it: the bisection's band is the half of the
    # tolerance band that the slope maps to the estimate, so that noise can take the other half.
    aim, slope = target, 1.0
    for attempt in range(1, 7):
        tried.clear()
        band = tolerance * target / (2 * slope * aim)
        try:
            plan = _bisect(normalised, aim, estimated, band, iterations, round_to, units, multiples, blocks, "latency")
        except BudgetError:
            plan = None
        if plan is None or _plan_key(plan) in measured:
            fresh = [(p, r) for p, r in tried if _plan_key(p) not in measured]
            if not fresh:
                break
            why = "no plan's estimate lands" if plan is None else "the plan found was measured already, none other"
            plan, guess = min(fresh, key=lambda t: abs(t[1] - aim))
            log.info(
                "latency search: %s within %.2f%% of the estimate %.4f; the closest plan not measured yet, estimated "
                "%.4f, is measured instead",
                why,
                100 * band,
                aim,
                guess,
            )
        ratio = judged(plan, f"candidate {attempt}")
        if ratio is not None:
            return plan, ratio
        aim, slope = _aim([(guess, b.ratio * scale) for guess, b in measured.values()], target)
    results = sorted((b.ratio * scale for _, b in measured.values()), key=lambda r: abs(r - target))
    raise BudgetError(
        f"no candidate's measured latency came within {tolerance:.2%} of the target {target:.4g} (the closest "
        f"{results[0]:.4f}; all {', '.join(f'{r:.4f}' for r in sorted(results))}, medians of interleaved rounds beside "
        f"the dense model, {noise()}); raise budget.latency_tolerance, or time on a quieter machine"
    )


def _aim(points: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The estimate at which a plan should measure `target`, from (estimate, measured ratio) pairs of the plans built
    so far, in the order they were measured, and the slope of measured over estimated there.

    The closest bounds are the highest estimate measured under the target and the lowest measured over it. With both
    (in that order): linear between them, or their middle where the last two plans fell on the same side (measured
    latency can be a staircase over the estimate, and interpolation then creeps from one side). With one: its estimate
    scaled by target / measured; where noise put the bounds out of order, that of the plan measured closest to the
    target.
    """
    under, over = [p for p in points if p[1] < target], [p for p in points if p[1] >= target]
    if under and over and max(under)[0] < min(over)[0]:
        (e0, m0), (e1, m1) = max(under), min(over)
        slope = (m1 - m0) / (e1 - e0)
        if len(points) > 1 and (points[-1][1] < target) == (points[-2][1] < target):
            return (e0 + e1) / 2, slope
        return e0 + (target - m0) / slope, slope
    estimate, ratio = (
        min(points, key=lambda p: abs(p[1] - target)) if under and over else max(under) if under else min(over)
    )
    return estimate * target / ratio, ratio / estimate


def _plan_key(plan) -> tuple:
    """A hashable form of a ChannelPlan's kept channels."""
    return tuple(sorted((name, tuple(kept)) for name, kept in plan.keep.items()))


def _bisect(normalised, target, estimated, tolerance, iterations, round_to, units, multiples, blocks, metric):
    """The threshold plan whose estimated ratio is within `tolerance` of `target` (relative), by bisection.

    Where no threshold lands in the band (ties, or a coarse layer whose next channel costs more than the
    band is wide, make the ratio jump past it), the closest plan under budget is completed channel by
    channel in score order (`_complete`); only a budget that no such plan meets fails.
    """
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(iterations):
        tau = (lo + hi) / 2
        plan = plan_by_threshold(normalised, tau, round_to, units, multiples, blocks)
        ratio = estimated(plan)
        if abs(ratio - target) / target <= tolerance:
            return plan
        if ratio <= target and (best is None or ratio > best[1]):
            best = (plan, ratio)
        if ratio > target:
            lo = tau
        else:
            hi = tau
    if best is not None:
        plan, ratio = _complete(normalised, best[0], target, tolerance, estimated, round_to, units, multiples, blocks)
        if abs(ratio - target) / target <= tolerance:
            log.info(
                "budget: no threshold lands within %.2f%% of %s %.4g (closest under budget %.4g); completed channel by "
                "channel in score order to %.4g",
                100 * tolerance,
                metric,
                target,
                best[1],
                ratio,
            )
            return plan
        best = (plan, ratio)
    closest = (
        f"closest under budget: {best[1]:.4g}, completed channel by channel"
        if best
        else "no candidate was under budget"
    )
    raise BudgetError(
        f"no plan brings the {metric} ratio within {tolerance:.2%} of {target:.4g} ({closest}); raise budget.tolerance"
    )


def _complete(normalised, plan, target, tolerance, estimated, round_to, units, multiples, blocks):
    """Grow an under-budget plan one step of one group at a time, best next channel first, while it stays in budget.

    A step is the smallest increase of a group's count that keeps one more channel (or unit, or one more
    channel in each block) under the group's rounding; the group whose next unit has the highest score
    goes first. A step that would go over `target * (1 + tolerance)` is not taken and closes its group: a
    plan's cost only grows as channels are added, so that step would never fit later either. Stops once
    the ratio is within the band, or when every group is closed. Returns the plan and its estimated ratio.
    """
    units, multiples, blocks = units or {}, multiples or {}, blocks or {}
    counts = {name: len(kept) for name, kept in plan.keep.items()}
    sizes = {name: s.numel() for name, s in normalised.items()}

    def realized(name: str, count: int) -> int:
        # The number of channels `plan_by_counts` keeps for this count (see its rounding).
        unit, parts = units.get(name, 1), blocks.get(name, 1)
        count = keep_count(count, sizes[name], round_to, unit, multiples.get(name, 1))
        if parts > 1:
            width = sizes[name] // parts
            return parts * math.ceil(min(width, max(1, count // parts)) / unit) * unit
        return math.ceil(count / unit) * unit

    def next_count(name: str) -> int | None:
        now = counts[name]
        for count in range(now + 1, sizes[name] + 1):
            if realized(name, count) > now:
                return realized(name, count)
        return None

    ranked = {
        name: torch.sort(unit_scores(s, units.get(name, 1)), descending=True).values for name, s in normalised.items()
    }
    ratio = estimated(plan)
    closed: set[str] = set()
    while ratio < target * (1 - tolerance):
        steps = []
        for name in counts:
            if name in closed:
                continue
            count = next_count(name)
            if count is None:
                closed.add(name)
                continue
            # The score of the group's best unit not kept yet.
            steps.append(
                (float(ranked[name][min(counts[name] // units.get(name, 1), ranked[name].numel() - 1)]), name, count)
            )
        if not steps:
            break
        _, name, count = max(steps, key=lambda step: step[0])
        trial = plan_by_counts(normalised, {**counts, name: count}, units, blocks)
        value = estimated(trial)
        if value > target * (1 + tolerance):
            closed.add(name)
            continue
        counts[name], plan, ratio = count, trial, value
    return plan, ratio


def structured_plan(model: nn.Module, scores: dict[str, torch.Tensor], ctx):
    """The ChannelPlan the experiment's budget asks for, given per-channel scores of prunable groups.

    `budget.layer_ratios` fixes the fraction removed per group; otherwise a global threshold is
    searched to meet `budget.flops` or `budget.params`, fractions of the dense backbone
    (`ctx.dense`) to keep. `ctx` is the pipeline's Context (budget, input_shape, dense).
    """
    budget, input_shape = ctx.budget, ctx.input_shape
    if not scores:
        raise BudgetError(
            "no channel group of this model can lose channels (the reason each is kept whole is logged above), so no "
            "structured budget can be met; an unstructured method (method=magnitude) prunes its weights instead"
        )
    round_to = int(budget.get("round_to") or 1)
    groups = [g for g in channel_groups(model, input_shape) if g.name in scores]
    scores = tie_scores(scores, groups)
    units = {g.name: g.unit for g in groups}
    multiples = {g.name: g.multiple for g in groups}
    blocks = {g.name: g.blocks for g in groups}
    if budget.get("layer_ratios"):
        ratios = parse_layer_ratios(list(budget.layer_ratios), groups)
        counts = {
            n: keep_count(
                round(s.numel() * (1 - ratios.get(n, 0.0))), s.numel(), round_to, units.get(n, 1), multiples.get(n, 1)
            )
            for n, s in scores.items()
        }
        return plan_by_counts(scores, counts, units, blocks)
    for metric in ("flops", "params", "latency"):
        if budget.get(metric) is not None:
            target = float(budget[metric])
            if not 0.0 < target <= 1.0:
                raise BudgetError(f"budget.{metric} is the fraction to keep, in (0, 1]; got {target}")
            latency = None
            if metric == "latency":
                latency = {
                    **budget_latency(budget),
                    "cache_dir": budget.get("latency_cache"),
                    "ranking": budget.get("latency_ranking", "importance"),
                    "rounds": int(budget.get("latency_rounds", 5)),
                }
            plan, _ = search_threshold(
                model,
                scores,
                target,
                input_shape,
                metric=metric,
                latency=latency,
                tolerance=float(budget.get("latency_tolerance" if metric == "latency" else "tolerance", 0.01)),
                iterations=int(budget.get("iterations", 30)),
                round_to=round_to,
                reference=_reference(model, ctx, metric),
                units=units,
                multiples=multiples,
                blocks=blocks,
            )
            return plan
    raise BudgetError("structured pruning needs budget.flops, budget.params, budget.latency or budget.layer_ratios")


def _reference(model: nn.Module, ctx, metric: str) -> float | None:
    """The dense backbone's count a budget is relative to (None: the model's own, counted by the search).

    A latency is measured again by the search, beside its candidates, when the model still has the dense
    architecture: the one measured when the run started may be minutes old, on a machine in another state.
    """
    if not ctx.dense:
        return None
    if metric == "latency" and count_flops(model, ctx.input_shape) == ctx.dense.get("flops"):
        return None
    return ctx.dense.get(metric)


def budget_latency(budget) -> dict:
    """How the latency budget measures (`deployed_latency`'s batch_size, device and format), from `budget`."""
    return {
        "batch_size": int(budget.get("latency_batch_size", 1)),
        "device": budget.get("latency_device", "auto"),
        "format": budget.get("latency_format", "torchscript_frozen"),
    }
