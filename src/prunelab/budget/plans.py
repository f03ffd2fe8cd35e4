"""Plans from scores: channels to keep per group (counts, thresholds, layer ratios) and weights to keep (top-k)."""

from __future__ import annotations

import math

import torch

from prunelab.errors import BudgetError
from prunelab.structure import ChannelPlan, MaskPlan
from prunelab.structure.channel_group import keep_count


def parse_layer_ratios(spec: list, groups: list) -> dict[str, float]:
    """Per-group fractions of channels to remove, from a list given per stage or per layer range.

    A list of numbers gives one ratio per stage of the model (its top-level blocks that hold layers:
    `[0, 0.75, 0.75, 0.32, 0]` for a CIFAR ResNet's stem, three stages and classifier). Strings
    `"a-b:r"` or `"a:r"` give ratio r to the groups whose root layer has index a..b among the model's
    conv/linear layers (0-based, inclusive), e.g. `["1-15:0.7"]` for VGG-19's convolutions.
    """
    ratios: dict[str, float] = {}
    if all(isinstance(r, (int, float)) for r in spec):
        stages = 1 + max(g.stage for g in groups)
        if len(spec) < stages:
            raise BudgetError(
                f"layer_ratios has {len(spec)} entries but the model's prunable groups span {stages} stages"
            )
        ratios = {g.name: float(spec[g.stage]) for g in groups}
    else:
        for item in spec:
            try:
                span, ratio = str(item).split(":")
                first, _, last = span.partition("-")
                lo, hi, r = int(first), int(last or first), float(ratio)
            except ValueError as err:
                raise BudgetError(f"layer_ratios entry {item!r} is not 'a-b:ratio' or 'a:ratio'") from err
            for g in groups:
                if lo <= g.layer_index <= hi:
                    ratios[g.name] = r
    bad = {k: v for k, v in ratios.items() if not 0.0 <= v < 1.0}
    if bad:
        raise BudgetError(f"layer ratios must be in [0, 1) (a layer never loses all channels): {bad}")
    return ratios


def unit_scores(scores: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """One score per unit of `unit` consecutive channels: their mean (the channel scores when unit is 1)."""
    if unit <= 1:
        return scores
    if scores.numel() % unit:
        raise ValueError(f"a group of {scores.numel()} channel scores cannot be cut into units of {unit}")
    return scores.reshape(-1, unit).mean(1)


def tie_scores(scores: dict[str, torch.Tensor], groups: list) -> dict[str, torch.Tensor]:
    """Scores where a group's tied blocks (`ChannelGroup.tied`) all hold, at each position, the mean of their scores
    there: channel p of each goes with the others', so they keep the same positions."""
    out = dict(scores)
    for g in groups:
        if g.tied and g.name in scores:
            per_block = scores[g.name].reshape(g.blocks, -1).clone()
            per_block[g.tied] = per_block[g.tied].mean(0)
            out[g.name] = per_block.flatten()
    return out


def plan_by_counts(
    scores: dict[str, torch.Tensor],
    counts: dict[str, int],
    units: dict[str, int] | None = None,
    blocks: dict[str, int] | None = None,
):
    """A ChannelPlan keeping, in each group, the `counts[group]` channels with the highest scores.

    A group with a unit in `units` (`ChannelGroup.unit`) keeps whole units, ranked by their mean
    score, with its count rounded up to a multiple of the unit. A group of `blocks` equal blocks
    (`ChannelGroup.blocks`: an attention's heads by dimension, the chunks of an equal split) keeps
    count / blocks channels of each, in whole units.
    """
    keep = {}
    for name, s in scores.items():
        parts = (blocks or {}).get(name, 1)
        unit = (units or {}).get(name, 1)
        if parts > 1:
            per_block = s.detach().cpu().reshape(parts, -1)
            width = per_block.shape[1]
            each = math.ceil(min(width, max(1, counts[name] // parts)) / unit)
            kept_units = [keep_top(unit_scores(per_block[b], unit), each).repeat_interleave(unit) for b in range(parts)]
            keep[name] = [b * width + int(j) for b in range(parts) for j in torch.nonzero(kept_units[b]).flatten()]
            continue
        kept = keep_top(unit_scores(s.detach().cpu(), unit), math.ceil(counts[name] / unit))
        keep[name] = torch.nonzero(kept.repeat_interleave(unit)).flatten().tolist()
    return ChannelPlan(keep=keep, sizes={name: int(s.numel()) for name, s in scores.items()})


def plan_by_threshold(
    scores: dict[str, torch.Tensor],
    tau: float,
    round_to: int = 1,
    units: dict[str, int] | None = None,
    multiples: dict[str, int] | None = None,
    blocks: dict[str, int] | None = None,
):
    """A ChannelPlan keeping the channels whose score is at least `tau` (at least one per group).

    A group with a unit in `units` keeps the whole units whose mean score is at least `tau`; one
    in `multiples` keeps a multiple of that many channels (rounded up); one in `blocks` as many in
    each of its blocks (`plan_by_counts`).
    """
    units, multiples = units or {}, multiples or {}
    counts = {}
    for name, s in scores.items():
        unit = units.get(name, 1)
        above = int((unit_scores(s, unit) >= tau).sum()) * unit
        counts[name] = keep_count(above, s.numel(), round_to, unit, multiples.get(name, 1))
    return plan_by_counts(scores, counts, units, blocks)


def unstructured_plan(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global"):
    """A MaskPlan removing exactly `sparsity` of the scored weights: the lowest scores go first.

    "global" ranks all weights together (exact to one weight overall); "layer" removes the same
    fraction from every tensor (exact to one weight per tensor). Ties break by position, so the
    result is deterministic.
    """
    if not 0.0 <= sparsity < 1.0:
        raise BudgetError(f"budget.sparsity is the fraction of weights to remove, in [0, 1); got {sparsity}")
    if scope not in ("global", "layer"):
        raise BudgetError(f"budget.scope must be 'global' or 'layer', got {scope!r}")
    if scope == "layer":
        return MaskPlan(
            {name: keep_top(s.detach().cpu(), s.numel() - round(sparsity * s.numel())) for name, s in scores.items()}
        )
    total = sum(s.numel() for s in scores.values())
    return MaskPlan(keep_top_global(scores, total - round(sparsity * total)))


def keep_top(values: torch.Tensor, k: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """The one top-k of prunelab: a bool mask of exactly the k largest values, shaped like `values`.

    Ties at the k-th value go first to the entries `prefer` marks (e.g. those kept so far), then to the
    lower positions, so the result is deterministic. It takes linear time: a selection of the k-th
    value, then a sort of the tied entries only.
    """
    flat = values.detach().flatten().float()
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(values.shape, k >= n, dtype=torch.bool, device=values.device)
    kth = torch.kthvalue(flat, n - k + 1).values
    top = flat > kth
    tied = torch.nonzero(flat == kth).flatten()
    missing = k - int(top.sum())
    if missing == tied.numel():
        top[tied] = True
    else:
        # Among equal values the preferred entries go first, then the lower positions (a stable sort).
        first = (
            ~prefer.flatten()[tied].to(top.device) if prefer is not None else torch.zeros_like(tied, dtype=torch.bool)
        )
        order = torch.argsort(first.to(torch.int8), stable=True)
        top[tied[order[:missing]]] = True
    return top.view(values.shape)


def keep_top_global(
    scores: dict[str, torch.Tensor], k: int, prefer: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """`keep_top` over all tensors ranked together: the k largest scores overall, as per-tensor masks."""
    flat = torch.cat([s.detach().float().cpu().flatten() for s in scores.values()])
    flat_prefer = torch.cat([prefer[n].detach().cpu().flatten() for n in scores]) if prefer is not None else None
    keep = keep_top(flat, k, flat_prefer)
    parts = keep.split([s.numel() for s in scores.values()])
    return {name: part.view(s.shape) for (name, s), part in zip(scores.items(), parts)}
