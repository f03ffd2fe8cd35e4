"""Greedy imitation under a budget: recorded per-layer trajectories, read at any epsilon, and their completion.

In one layer the greedy trajectory (A_k, the neurons kept, the loss gap after step k) does not depend on
epsilon: the layer's mini-batches are seeded and fixed, so epsilon only decides at which step the layer
stops (the first k with gap_k <= epsilon). A pass that records each layer's steps therefore knows the plan
of that layer for every larger epsilon (an earlier stop) and, where it recorded past its own stop, for
smaller ones down to the epsilon it recorded to. Later layers would be imitated from a network whose
earlier layers stopped elsewhere, so a recorded trajectory is exact for the first layer and a prediction
for the others; `GreedyImitation._search` uses one pass's recording to choose the epsilon of the next pass
and completes the last pass along its own recording (`complete`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.budget import keep_count
from prunelab.structure import ChannelPlan


@dataclass
class Trajectory:
    """One imitation's steps in one layer: per step the kept count, loss gap, discrepancies and A (its support).

    `capped`: the layer ran all its steps (`max_steps`), so every epsilon below its gaps leaves the layer whole;
    otherwise the trajectory is known down to its smallest gap (`floor`).
    """

    method: str
    size: int
    gaps: list[float] = field(default_factory=list)
    discrepancies: list[float] = field(default_factory=list)
    layer_discrepancies: list[float | None] = field(default_factory=list)
    support: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    capped: bool = False

    def add(self, a: torch.Tensor, gap: float, discrepancy: float, layer_discrepancy: float | None) -> None:
        """Record one step (A is stored as its non-zero entries: rebuilt exactly by `a`)."""
        index = torch.nonzero(a > 0).flatten()
        self.support.append((index.cpu(), a[index].cpu().clone()))
        self.gaps.append(gap)
        self.discrepancies.append(discrepancy)
        self.layer_discrepancies.append(layer_discrepancy)

    def history(self) -> list[tuple[int, float]]:
        """(neurons kept, network discrepancy) after every step."""
        return [(int(index.numel()), d) for (index, _), d in zip(self.support, self.discrepancies)]

    @property
    def floor(self) -> float:
        """The smallest epsilon whose stop this recording knows."""
        return -math.inf if self.capped else min(self.gaps)

    def a(self, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A after step k (float64, on the simplex)."""
        index, values = self.support[k]
        out = torch.zeros(self.size, dtype=torch.float64)
        out[index] = values
        return out.to(device)

    def stop(self, epsilon: float) -> int | None:
        """The step at which the rule stops at `epsilon` (None: not met within the steps, the layer stays whole)."""
        if epsilon < self.floor:
            raise ValueError(f"epsilon {epsilon} is below what this trajectory recorded ({self.floor})")
        return next((k for k, gap in enumerate(self.gaps) if gap <= epsilon), None)

    def found(self, epsilon: float) -> dict[str, Any]:
        """What `GreedyImitation._imitate` returns for a run that stops at `epsilon` (A, kept neurons, how it ended)."""
        k = self.stop(epsilon)
        if k is None:  # unmet: the layer stays whole
            a = torch.full((self.size,), 1.0 / self.size, dtype=torch.float64)
            found = {"a": a, "steps": len(self.gaps), "discrepancy": 0.0, "gap": self.gaps[-1], "converged": False}
        else:
            a = self.a(k)
            found = {
                "a": a,
                "steps": k + 1,
                "discrepancy": self.discrepancies[k],
                "gap": self.gaps[k],
                "converged": True,
            }
            if self.layer_discrepancies[k] is not None:
                found["layer_discrepancy"] = self.layer_discrepancies[k]
        return {"method": self.method, "keep": torch.nonzero(a > 0).flatten().tolist(), **found}


@dataclass
class Layer:
    """One channel group's recorded imitations in one pass, and how its plan is read from them at an epsilon.

    `priority` ranks the neurons `budget.round_to` pads a layer with (the consumer's input-weight magnitudes).
    """

    group: str
    size: int
    consumers: list[str]
    tries: list[Trajectory]
    priority: torch.Tensor
    round_to: int = 1
    _ladder: list[float] | None = None

    @property
    def floor(self) -> float:
        return max(t.floor for t in self.tries)

    def found(self, epsilon: float) -> dict[str, Any]:
        """Algorithm 2's choice for this layer at `epsilon`: the imitation keeping fewer neurons (tie: smaller
        discrepancy), padded to `round_to`."""
        tries = [t.found(epsilon) for t in self.tries]
        best = min(tries, key=lambda t: (len(t["keep"]), t["discrepancy"]))
        wanted = keep_count(len(best["keep"]), self.size, self.round_to)
        if wanted > len(best["keep"]):
            # budget.round_to: pad with the pruned neurons whose consumer weights are largest; their a_i stay
            # 0 (the folded output is unchanged) and fine-tuning trains them.
            weight = self.priority.clone()
            weight[best["keep"]] = -math.inf
            extra = torch.topk(weight, wanted - len(best["keep"])).indices.tolist()
            best = {**best, "keep": sorted(best["keep"] + extra)}
        return {
            **best,
            "group": self.group,
            "size": self.size,
            "alternatives": {t["method"]: {"kept": len(t["keep"]), "discrepancy": t["discrepancy"]} for t in tries},
        }

    def ladder(self) -> list[float]:
        """The epsilons at which this layer's plan changes, largest first (fewest neurons first), one per distinct
        plan: each stands for the range up to the next larger one. -inf (the layer whole) where every imitation
        ran out of steps."""
        if self._ladder is None:
            values = sorted({g for t in self.tries for g in t.gaps if g >= self.floor}, reverse=True)
            if self.floor == -math.inf:
                values.append(-math.inf)
            # A plan holds from the smallest epsilon that gives it up to the next plan's: keep that smallest one.
            ladder: list[float] = []
            last = None
            for value in values:
                key = tuple(t.stop(value) for t in self.tries)
                if key == last:
                    ladder[-1] = value
                else:
                    ladder.append(value)
                    last = key
            self._ladder = ladder
        return self._ladder

    def rung(self, epsilon: float) -> int:
        """The ladder position whose plan the rule gives at `epsilon` (>= `floor`)."""
        ladder = self.ladder()
        # The first (largest) rung at or below epsilon: the ladder is descending.
        return min(bisect.bisect_left([-v for v in ladder], -epsilon), len(ladder) - 1)


def plan_of(layers: list[Layer], epsilons: list[float]) -> tuple[ChannelPlan, list[dict[str, Any]]]:
    """The ChannelPlan and the per-layer choices of `layers` read at per-layer `epsilons`."""
    found = [layer.found(eps) for layer, eps in zip(layers, epsilons)]
    return ChannelPlan({f["group"]: f["keep"] for f in found}, {layer.group: layer.size for layer in layers}), found


def aim(
    layers: list[Layer], target: float, mid: float, estimated: Callable[[ChannelPlan], float]
) -> tuple[float, float, float]:
    """The epsilon whose plan, read from a pass's trajectories, is estimated closest to `target` (the next pass runs
    at it), and the largest epsilon below it estimated at `mid` or more (the next pass records down to it, so that
    a completion has room on both sides). Returns (epsilon, its estimate, record_to)."""
    floor = max(layer.floor for layer in layers)
    candidates = sorted({v for layer in layers for v in layer.ladder() if v >= floor} | {floor})
    predicted = [(eps, estimated(plan_of(layers, [eps] * len(layers))[0])) for eps in candidates]
    epsilon, estimate = min(predicted, key=lambda p: (abs(p[1] - target), p[0]))
    record_to = max((eps for eps, value in predicted if eps <= epsilon and value >= mid), default=floor)
    return epsilon, estimate, record_to


def complete(
    layers: list[Layer],
    epsilons: list[float],
    target: float,
    tolerance: float,
    estimated: Callable[[ChannelPlan], float],
) -> tuple[list[float], float, int]:
    """Move single layers' stops (from per-layer `epsilons`) along their recorded trajectories until the estimate is
    within `tolerance` of target.

    Over budget, the next stop taken is the earlier one (fewer neurons) that tolerates the smallest loss gap
    among all layers (as if epsilon were raised for that layer alone); under budget, the layer stopped at the
    largest gap takes its next recorded step. A move that would cross the band on the far side is not taken
    and closes its layer. Returns the per-layer epsilons, the estimate and the moves taken.
    """
    low, high = target * (1 - tolerance), target * (1 + tolerance)
    position = [layer.rung(eps) for layer, eps in zip(layers, epsilons)]

    def at(pos: list[int]) -> list[float]:
        return [layer.ladder()[j] for layer, j in zip(layers, pos)]

    ratio = estimated(plan_of(layers, at(position))[0])
    closed: set[int] = set()
    moves = 0
    while not low <= ratio <= high:
        fewer = ratio > high
        steps = []
        for index, layer in enumerate(layers):
            j = position[index] + (-1 if fewer else 1)
            if index in closed or not 0 <= j < len(layer.ladder()):
                continue
            key = layer.ladder()[j] if fewer else -layer.ladder()[position[index]]
            steps.append((key, index, j))
        if not steps:
            break
        _, index, j = min(steps)
        trial = [*position[:index], j, *position[index + 1 :]]
        value = estimated(plan_of(layers, at(trial))[0])
        if (fewer and value < low) or (not fewer and value > high):
            closed.add(index)
            continue
        position, ratio, moves = trial, value, moves + 1
    return at(position), ratio, moves
