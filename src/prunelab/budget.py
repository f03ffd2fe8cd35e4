"""Measuring models: multiply-accumulates ("FLOPs", as the pruning papers count them), parameters, sparsity."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.validate import ConfigError

log = logging.getLogger(__name__)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of `input_shape` (C, H, W).

    PyTorch's FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matrix
    products; we halve it to report MACs, the unit the pruning papers call FLOPs. Element-wise layers
    (BN, ReLU, additions) are not counted, as in those papers. The model runs in eval mode, and every
    submodule gets its own training flag back afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    with _counting(model) as counter:
        model(x)
    return counter.get_total_flops() // 2


@contextmanager
def _counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """FlopCounterMode over a forward pass in eval mode without gradients. The parameters stop requiring gradients
    meanwhile: a view of one made under no_grad still requires them, with no autograd node, and FlopCounterMode's
    module tracker fails on it as a module's input (timm's PiT and CaiT pass an expanded class token)."""
    from prunelab.structure import eval_mode, freeze, unfreeze

    flags = freeze(model)
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        unfreeze(model, flags)


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the prunable weights."""
    from prunelab.structure import prunable_weights

    weights = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def measure(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs (MACs), parameters and sparsity of a model, as `summary.json` reports them."""
    return {"flops": count_flops(model, input_shape), "params": count_params(model), "sparsity": sparsity(model)}


def time_call(
    fn, x: torch.Tensor, warmup: int = 3, repeats: int = 10, seconds: float = 0.0, max_seconds: float | None = None,
    label: str = "", least: int = 3, quiet: bool = False, fastest: bool = False,
) -> float:
    """Median time in milliseconds of `fn(x)` under inference mode, after `warmup` calls (`fastest`: the fastest call's).

    At least `repeats` timed calls, more (up to 20 times as many) until they add up to `seconds`. On
    CUDA each call is timed with CUDA events (the GPU's own clock), on the CPU with the wall clock.
    With `max_seconds`, warm-up and timing each stop once all calls so far took that long, after at
    least one warm-up (when any was asked for) and `least` timed calls (a large model at batch 64 on a
    CPU: seconds a call), and the log says so, naming the measurement by `label`, unless `quiet` (a
    caller that times in rounds says it once for all of them).
    """
    import statistics
    import time

    cuda = x.device.type == "cuda"
    times: list[float] = []
    began = time.perf_counter()
    warm = 0
    over = lambda: max_seconds is not None and time.perf_counter() - began >= max_seconds  # noqa: E731
    with torch.inference_mode():
        while warm < warmup and not (warm >= 1 and over()):
            fn(x)
            warm += 1
        if cuda:
            torch.cuda.synchronize(x.device)
        while len(times) < 20 * repeats:
            if len(times) >= repeats and sum(times) >= seconds * 1000.0 or len(times) >= least and over():
                break
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(x)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - start) * 1000.0)
    if (warm < warmup or len(times) < repeats) and not quiet:
        log.info(
            "%sbatch %d: %d timed calls after %d warm-up (not %d after %d): a call takes %.2f s and a measurement "
            "stops after %g s (latency.max_seconds)", f"{label} " if label else "", x.shape[0], len(times), warm, repeats, warmup,
            statistics.median(times) / 1000.0, max_seconds,
        )
    return min(times) if fastest else statistics.median(times)


@dataclass
class Beside:
    """A model's times (ms) taken in interleaved rounds with those of a reference (the dense model): reference, model,
    reference, model, ...

    Load on a shared machine comes and goes over seconds; within a round it slows both alike, so each round gives a ratio
    that the load barely moves, and the median of the rounds' ratios is the statistic that holds under load (a single
    round's, or the two fastest times' ratio, moves with whichever model a burst of load hit). `spread` is the
    round-to-round spread of those ratios, the machine's noise as this measurement saw it. Without a reference
    (`reference` empty) only the model's own figures are defined.
    """

    reference: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.model)

    @property
    def ratios(self) -> list[float]:
        """Each round's model time over the reference's, in increasing order."""
        return sorted(m / r for m, r in zip(self.model, self.reference))

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios: model latency as a fraction of the reference's."""
        return _median(self.ratios)

    @property
    def speedups(self) -> list[float]:
        """Each round's reference time over the model's, in increasing order."""
        return [1 / r for r in reversed(self.ratios)]

    @property
    def spread(self) -> float:
        """Round-to-round spread: the range of the rounds' ratios relative to their median (of the model's own times
        without a reference)."""
        values = self.ratios if self.reference else sorted(self.model)
        return (values[-1] - values[0]) / _median(values) if values else 0.0

    def interval(self, confidence: float = 0.8) -> tuple[float, float]:
        """Bounds on the median ratio that hold with at least `confidence` (the rounds' extremes where too few rounds
        give that): order statistics of the rounds' ratios, which need no assumption on how the noise is distributed.
        With 5 rounds they are the slowest and fastest round (94%); more rounds narrow them."""
        values = self.ratios
        n, k = len(values), 1
        while k + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_tail(n, k + 1) >= confidence:
            k += 1
        return values[k - 1], values[n - k]

    def extend(self, other: Beside) -> None:
        """Add the rounds of another measurement of the same two models."""
        self.reference.extend(other.reference)
        self.model.extend(other.model)

    def figures(self) -> dict[str, float]:
        """The model's and the reference's latency (median over rounds, fastest and slowest round) and the speedup
        (median of the rounds', lowest and highest round's) and round-to-round spread, for a summary."""
        out = {"ms": _median(self.model), "ms_min": min(self.model), "ms_max": max(self.model)}
        if self.reference:
            out.update({"dense_ms": _median(self.reference), "dense_ms_min": min(self.reference),
                        "dense_ms_max": max(self.reference), "speedup": _median(self.speedups), "speedup_min": self.speedups[0],
                        "speedup_max": self.speedups[-1]})
        out["spread"] = self.spread
        return {k: round(v, 4) for k, v in out.items()}

    def describe(self) -> str:
        """One phrase for the log: rounds, and the median ratio with its lowest and highest round's."""
        if not self.reference:
            return f"{self.rounds} rounds, median {_median(self.model):.4g} ms"
        return f"{self.rounds} interleaved rounds, ratio {self.ratio:.4f} ({self.ratios[0]:.4f}-{self.ratios[-1]:.4f})"


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _binomial_tail(n: int, k: int) -> float:
    """P(X < k) for X ~ Binomial(n, 1/2): how often fewer than k of n rounds fall below the true median."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def time_rounds(
    fns: list, x: torch.Tensor, rounds: int, timer, first=None, max_seconds: float | None = None, label: str = ""
) -> list[list[float]]:
    """Times (ms) of each callable in `fns`, one `timer(fn, x)` each per round (`first(fn, x)` in the first round, which
    warms them up), interleaved: fns[0], fns[1], ..., fns[0], fns[1], ... With `max_seconds` (per callable), rounds stop
    after three once they took that long in all, and the log says so, naming the measurement by `label`."""
    import time

    times: list[list[float]] = [[] for _ in fns]
    began = time.perf_counter()
    for done in range(rounds):
        if max_seconds is not None and done >= 3 and time.perf_counter() - began >= max_seconds * len(fns):
            log.info(
                "%sbatch %d: %d of %d interleaved rounds in %.1f s: a measurement stops after %g s a model "
                "(latency.max_seconds)", f"{label} " if label else "", x.shape[0], done, rounds,
                time.perf_counter() - began, max_seconds,
            )
            break
        for fn, own in zip(fns, times):
            own.append(float((first if done == 0 and first is not None else timer)(fn, x)))
    return times


def latency_beside(
    model: nn.Module,
    reference: nn.Module | None,
    input_shape: tuple[int, ...],
    batch_sizes: tuple[int, ...] = (1, 64),
    device: str | torch.device = "auto",
    format: str = "eager",
    rounds: int = 5,
    warmup: int = 3,
    repeats: int = 10,
    seconds: float = 0.0,
    max_seconds: float | None = None,
    label: str = "",
) -> dict[int, Beside]:
    """Latency of `model` beside `reference` (None: the model alone) in `format` at each batch size, as `Beside`
    measurements of `rounds` interleaved rounds (reference, model, reference, model, ...).

    Each model is exported once. `warmup` calls precede the first round; every round then times
    `repeats / rounds` calls (at least one) of each and keeps their median, so the rounds hold as many
    timed calls as one measurement of `repeats` calls, and `seconds` of them. With `max_seconds` a
    model's rounds together stop once they took that long, after at least three rounds of one timed call.
    """
    device = latency_device(device)
    nets = [deployed(m, input_shape, format, device) for m in ([reference] if reference is not None else []) + [model]]
    each = max(1, math.ceil(repeats / rounds))
    cap = max_seconds / rounds if max_seconds is not None else None
    options = {"repeats": each, "seconds": seconds / rounds, "max_seconds": cap, "least": 1, "quiet": True}
    timer = lambda fn, x: time_call(fn, x, warmup=0, **options)  # noqa: E731
    first = lambda fn, x: time_call(fn, x, warmup=warmup, **options)  # noqa: E731
    out = {}
    for b in batch_sizes:
        x = torch.randn(b, *input_shape, device=device)
        times = time_rounds(nets, x, rounds, timer, first, max_seconds, label)
        out[b] = Beside(times[0], times[1]) if reference is not None else Beside([], times[0])
    return out


def latency_device(device: str | torch.device = "auto") -> torch.device:
    """The device latency is measured on: "auto" picks CUDA when present."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def deployed(model: nn.Module, input_shape: tuple[int, ...], format: str, device: str | torch.device = "cpu"):
    """The model as it runs deployed in `format` ("eager": an eval-mode copy; else exported, reloaded, optimised)."""
    import copy
    import tempfile

    from prunelab.export import FORMATS, export_deployable, load_deployed

    device = latency_device(device)
    net = copy.deepcopy(model).to(device).eval()
    if format == "eager":
        return net
    with tempfile.TemporaryDirectory() as tmp:
        path = export_deployable(net, Path(tmp) / FORMATS[format], tuple(input_shape), format)
        return load_deployed(path, device, optimize=True)


def deployed_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    device: str | torch.device = "auto",
    format: str = "torchscript_frozen",
    timer=None,
) -> float:
    """What a latency budget measures: ms per batch of the model deployed in `format` (median, >= 0.3 s of calls)."""
    device = latency_device(device)
    net = deployed(model, input_shape, format, device)
    x = torch.randn(batch_size, *input_shape, device=device)
    return float(timer(net, x) if timer is not None else time_call(net, x, warmup=3, repeats=20, seconds=0.3))


def scratch_b_epochs(base_epochs: int, dense_flops: float, pruned_flops: float, max_factor: float | None = None) -> int:
    """Scratch-B (Liu et al. 2019): train the pruned model for the dense model's compute budget.

    The epochs grow by dense FLOPs / pruned FLOPs, at most by `max_factor` when one is given.
    """
    factor = dense_flops / max(pruned_flops, 1)
    if max_factor is not None:
        factor = min(factor, max_factor)
    return max(1, int(round(base_epochs * factor)))


class BudgetError(ConfigError):
    """The requested budget cannot be met (it says how close it got and why)."""


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


def keep_count(count: int, size: int, round_to: int = 1, unit: int = 1, multiple: int = 1) -> int:
    """Channels to keep: at least one, rounded up to a multiple of `round_to`, never more than `size`.

    A group read by grouped convolutions also rounds up to a multiple of its `unit`
    (`ChannelGroup.unit`), so that it keeps whole units, and one that must keep a multiple of some
    count (`ChannelGroup.multiple`, an attention's heads) to a multiple of that.
    """
    step = math.lcm(max(1, int(round_to)), max(1, int(unit)), max(1, int(multiple)))
    return min(size, math.ceil(max(1, int(count)) / step) * step)


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
    from prunelab.structure import ChannelPlan

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


class CostModel:
    """FLOPs and parameters of a pruned model computed from a plan, without building it.

    Counted once on the dense model: each conv/linear layer's multiply-accumulates (from its output
    shape, as FlopCounterMode counts them) and parameters, which group's channels it writes and which
    it reads (`ChannelGroup.layers`, `rows`, `consumers`, `reads`). Under a plan a layer's cost scales
    with its kept input and output channels, a group's BatchNorms with its kept channels, the attention products
    (query-key and attention-value) of a head group with its kept channels; everything else (pooling, other parameters) is taken as fixed, so `search_threshold` checks the final plan on the
    built model and corrects the target where that assumption does not hold.
    """

    def __init__(self, model: nn.Module, groups: list, input_shape: tuple[int, ...]):
        from prunelab.structure import PRUNABLE_TYPES
        from prunelab.structure.groups import channels_written, out_channels

        layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
        macs = dict.fromkeys(layers, 0)

        self.inputs: dict[str, tuple[int, ...]] = {}
        firsts: dict[str, int] = {}

        def hook(name):
            def record(module, inputs, output):
                self.inputs[name] = tuple(inputs[0].shape[1:])
                firsts[name] = int(inputs[0].shape[0])
                per_output = module.in_features if isinstance(module, nn.Linear) else (
                    module.in_channels // module.groups * math.prod(module.kernel_size)
                )
                macs[name] += output.numel() * per_output  # one example: a first dimension of windows or rows counts

            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
        folded: set[str] = set()
        param = next(model.parameters())
        try:
            with _counting(model) as counter:
                model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        self.dense = {"flops": counter.get_total_flops() // 2, "params": count_params(model)}
        self.sizes = {g.name: g.size for g in groups}
        # An attention's layers that no group sizes and that run on its heads folded into the first dimension (MViTv2's
        # pooling convolutions, one example: a first dimension of a multiple of the heads) cost in proportion to the heads.
        described = {n for g in groups for n in [*g.layers, *g.consumers]}
        for g in groups:
            heads = getattr(model.get_submodule(g.heads), "num_heads", 1) if g.heads else 1
            for name in layers:
                if heads > 1 and name.startswith(f"{g.heads}.") and name not in described and firsts.get(name, 1) % heads == 0:
                    folded.add(name)
        # What an attention module computes beyond its layers (those folded over its heads aside): its products, linear
        # in its kept width.
        counted = counter.get_flop_counts()
        self.products = {
            g.name: max(0, sum(counted.get(f"{type(model).__name__}.{g.heads}", {}).values()) // 2
                        - sum(n for layer, n in macs.items() if layer.startswith(f"{g.heads}.") and layer not in folded))
            for g in groups if g.heads
        }  # fmt: skip
        for name in folded:
            macs[name] = 0
        # An attention's own layers with one output per head (Swin V2's position-bias MLP) lose a row per removed head.
        per_head = {
            f"{g.heads}.{n}": [(g.name, [int(i % g.unit == 0) for i in range(g.size)])]
            for g in groups if g.heads and g.unit > 1
            for n, m in model.get_submodule(g.heads).named_modules()
            if isinstance(m, nn.Linear) and n not in ("qkv", "proj") and m.out_features == g.size // g.unit
        }  # fmt: skip
        self.layers = []
        for name, m in layers.items():
            weight = m.weight.numel() if m.weight is not None else 0
            bias = m.bias.numel() if m.bias is not None else 0
            reads = [(g.name, g.reads.get(name)) for g in groups if name in g.consumers]
            writes = [(g.name, channels_written(g, name)) for g in groups if name in g.layers] or per_head.get(name, [])
            fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            self.layers.append((macs[name], weight, bias, fan_in, out_channels(m), writes, reads))
        self.modules = list(layers.items())
        # Parameters per channel of each norm (a BatchNorm after a concatenation holds several groups' channels).
        norms = {name: sum(p.numel() for p in m.parameters()) // m.num_features for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        # Per channel of each group (a norm holding a channel twice, after a concatenation of it and its copy, twice).
        self.norm_params = {
            g.name: [sum(norms.get(n, 0) * (len(g.rows[n][c]) if n in g.rows else 1) for n in g.norms) for c in range(g.size)]
            for g in groups
        }  # fmt: skip
        # An attention's parameters with entries per head besides its layers (Swin V2's logit scale, position-bias tables,
        # LeViT's attention biases) lose a head's entries with it: parameters per channel of a group losing whole heads.
        self.head_params = {
            g.name: _per_head_parameters(model.get_submodule(g.heads), bool(g.rows)) / g.size
            for g in groups if g.heads and g.unit > 1
        }  # fmt: skip
        known = self._count(None, self.widths(None))
        self.fixed = {metric: self.dense[metric] - known[metric] for metric in self.dense}

    def widths(self, plan) -> list[tuple[int, int]]:
        """Each conv/linear layer's kept input and output channels under the plan (None: the dense widths)."""

        def removed(channels) -> int:
            total = 0
            for group, per_channel in channels:
                if plan is not None and group in plan.keep:
                    kept = plan.keep[group]
                    total += plan.sizes[group] - len(kept) if per_channel is None else sum(per_channel) - sum(per_channel[i] for i in kept)
            return total

        return [(fan_in - removed(reads), fan_out - removed(writes)) for _, _, _, fan_in, fan_out, writes, reads in self.layers]

    def _count(self, plan, widths: list[tuple[int, int]]) -> dict[str, int]:
        kept = plan.kept() if plan is not None else {}
        flops = params = 0
        for (macs, weight, bias, fan_in, fan_out, *_), (inp, out) in zip(self.layers, widths):
            # A grouped convolution whose channels follow its groups is no consumer: its fan-in stays, its cost scales with out.
            scale = inp * out / (fan_in * fan_out)
            flops += round(macs * scale)
            params += round(weight * scale) + (bias * out // fan_out if bias else 0)
        for name, per_channel in self.norm_params.items():
            params += sum(per_channel[c] for c in plan.keep[name]) if plan is not None and name in plan.keep else sum(per_channel)
        params += sum(round(n * kept.get(name, self.sizes[name])) for name, n in self.head_params.items())
        flops += sum(round(n * kept.get(name, self.sizes[name]) / self.sizes[name]) for name, n in self.products.items())
        return {"flops": flops, "params": params}

    def count(self, plan) -> dict[str, int]:
        """FLOPs (MACs) and parameters of the model with the plan applied."""
        counts = self._count(plan, self.widths(plan))
        return {metric: counts[metric] + self.fixed[metric] for metric in counts}


def _per_head_parameters(m: nn.Module, laid_out: bool) -> int:
    """How many parameters of an attention outside its Linear layers hold entries per head, as head pruning cuts them
    (`prunelab.structure.groups.prune_heads`): a laid-out attention's own parameters with heads first; else its own
    tables with heads last or one value per head, and its position-bias modules' tables with heads last."""
    heads = m.num_heads
    own = list(m.parameters(recurse=False))
    if laid_out:
        return sum(p.numel() for p in own if p.dim() and p.shape[0] == heads)
    total = sum(p.numel() for p in own if p.dim() and (p.shape[-1] == heads or (p.shape[0] == heads and p[0].numel() == 1)))
    layers = {id(getattr(m, n, None)) for n in ("qkv", "proj", "q_norm", "k_norm", "norm")}
    for child in (c for c in m.children() if id(c) not in layers):
        for sub in child.modules():
            if not isinstance(sub, nn.Linear):
                total += sum(p.numel() for p in sub.parameters(recurse=False) if p.dim() > 1 and p.shape[-1] == heads)
    return total


class LatencyModel(CostModel):
    """Latency of a pruned model estimated from a plan, the way NetAdapt and HALP do it.

    Each conv/linear layer gets a table of its latency over kept input and output channels, measured
    on the device at the batch size on a standalone layer of the same shape (eager, its fastest call; a grid of `grid` +
    1 counts per side that the plan can change, on multiples of `round_to`, bilinear in between; a depthwise convolution's inputs
    follow its outputs). Tables are keyed by the layer's shape, the device, threads, torch version and
    batch, and kept in `cache_dir`, so that they are measured once per machine. The deployed model
    (`format`) runs the same layers with fewer calls and other memory layouts (frozen TorchScript
    keeps MKL-DNN layouts between layers; a standalone frozen layer pays the conversion each call,
    so its tables would overstate wide layers), so the tables give each layer's share and measurements
    of the deployed model calibrate them (dense, and every group at 3/4, 1/2 and 1/4 of its channels,
    each timed beside the dense model): latency = a non-decreasing function of the sum of table entries
    through the measurements (`observe`), or of the MACs where those order the measurements better. `search_threshold`
    judges each built candidate by its own timing beside the dense model (`judge`). `timer(fn, x)` returns
    milliseconds; tests pass a deterministic one.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list,
        input_shape: tuple[int, ...],
        batch_size: int = 1,
        device: str | torch.device = "auto",
        format: str = "torchscript_frozen",
        cache_dir: str | Path | None = None,
        timer=None,
        grid: int = 8,
        round_to: int = 1,
        rounds: int = 5,
    ) -> None:
        import copy

        from prunelab.structure import apply_channel_plan

        super().__init__(model, groups, input_shape)
        self.input_shape = tuple(input_shape)
        self.batch_size, self.format, self.device = int(batch_size), format, latency_device(device)
        self.timer = timer or (lambda fn, x: time_call(fn, x, warmup=3, repeats=20, seconds=0.3))
        # A layer alone takes a few milliseconds, less than a time slice of the scheduler: on a loaded machine most of
        # its calls wait for one (medians of 10-44 ms for a 16-to-16 convolution at batch 64, in no order of width), the
        # fastest call does not. The tables only give the layers' shares, which the deployed model calibrates.
        self.probe_timer = timer or (lambda fn, x: time_call(fn, x, warmup=3, repeats=20, seconds=0.3, fastest=True))
        # A deployed model is timed in rounds beside the dense one: warmed up in the first, then at least 5 calls and
        # 0.2 s a round (many short rounds follow the machine's load better than a few long ones).
        self.first_timer = timer or (lambda fn, x: time_call(fn, x, warmup=3, repeats=5, seconds=0.2, quiet=True))
        self.round_timer = timer or (lambda fn, x: time_call(fn, x, warmup=0, repeats=5, seconds=0.2, quiet=True))
        self.rounds = int(rounds)
        self._dense_net = deployed(model, self.input_shape, self.format, self.device)
        self._x = torch.randn(self.batch_size, *self.input_shape, device=self.device)
        self.probes = 0
        self.cache = Path(cache_dir) / f"{self._machine_key()}.json" if cache_dir is not None else None
        known = json.loads(self.cache.read_text()) if self.cache is not None and self.cache.exists() else {}
        self.tables = []
        for (name, module), (_, _, _, fan_in, fan_out, writes, reads) in zip(self.modules, self.layers):
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            ins = self._points(fan_in, bool(reads) and not depthwise, grid, round_to)
            outs = self._points(fan_out, bool(writes), grid, round_to)
            table = known.setdefault(self._layer_key(module, self.inputs[name]), {})
            for cin in ins:
                for cout in outs:
                    if f"{cin},{cout}" not in table:
                        table[f"{cin},{cout}"] = self._probe(module, self.inputs[name], cin, cout)
            self.tables.append((ins, outs, table))
        if self.cache is not None and self.probes:
            from prunelab.io import write_json

            write_json(self.cache, known, sort_keys=True)
        # Calibration on the deployed model: dense, and every group at 3/4, 1/2 and 1/4 of its channels.
        self.by_macs = False
        self.observed: list[tuple[object, float]] = []
        self.dense["latency"] = float(self.timer(self._dense_net, self._x))
        self.observe(None, self.dense["latency"])
        # Each noisy, but a miss only moves the estimate: a candidate is accepted on its own measurement (`judge`).
        calibration: list[Beside] = []
        for keep in (0.75, 0.5, 0.25):
            uniform = plan_by_counts(
                {g.name: -torch.arange(g.size, dtype=torch.float) for g in groups},
                {g.name: keep_count(int(g.size * keep), g.size, 1, g.unit, g.multiple) for g in groups},
                {g.name: g.unit for g in groups},
                {g.name: g.blocks for g in groups},
            )
            calibration.append(self.beside_dense(apply_channel_plan(copy.deepcopy(model), uniform, input_shape), 3))
            self.observe(uniform, calibration[-1].ratio * self.dense["latency"])
        log.info(
            "latency model calibrated: dense %.4g ms deployed as %s at batch %d; every group at 3/4, 1/2 and 1/4 width "
            "timed in 3 rounds beside it: ratios %s, round-to-round spread %s", self.dense["latency"], self.format,
            self.batch_size, ", ".join(f"{b.ratio:.3f}" for b in calibration), ", ".join(f"{b.spread:.1%}" for b in calibration),
        )

    def beside_dense(self, model: nn.Module, rounds: int | None = None) -> Beside:
        """The deployed model timed in `rounds` (default: the model's `rounds`) interleaved with the dense model."""
        return self._rounds(deployed(model, self.input_shape, self.format, self.device), rounds or self.rounds, True)

    def _rounds(self, net, rounds: int, first: bool) -> Beside:
        dense, timed = time_rounds([self._dense_net, net], self._x, rounds, self.round_timer, self.first_timer if first else None)
        return Beside(dense, timed)

    def judge(self, model: nn.Module, low: float, high: float) -> Beside:
        """The deployed model timed beside the dense model until its median ratio is clearly inside [low, high] or
        clearly outside, or its bounds (`Beside.interval`) are narrower than the band's tolerance: in `rounds` rounds,
        then `rounds` more at a time, up to three times `rounds`. Where that bound is reached still unclear, the log
        says so and the median decides."""
        net = deployed(model, self.input_shape, self.format, self.device)
        most = 3 * self.rounds
        beside = self._rounds(net, self.rounds, True)
        tolerance = (high - low) / (high + low)

        def settled() -> bool:
            lo, hi = beside.interval()
            return low <= lo and hi <= high or hi < low or lo > high or hi - lo <= tolerance * beside.ratio

        while not settled() and beside.rounds < most:
            beside.extend(self._rounds(net, min(self.rounds, most - beside.rounds), False))
        if not settled():
            lo, hi = beside.interval()
            log.info(
                "latency search: still unclear after %d interleaved rounds (the bound, 3 x latency_rounds): the median "
                "ratio's bounds %.4f-%.4f straddle an edge of %.4f-%.4f and are wider than the %.2f%% tolerance "
                "(round-to-round spread %.1f%%); the median %.4f decides", beside.rounds, lo, hi, low, high,
                100 * tolerance, 100 * beside.spread, beside.ratio,
            )
        return beside

    def observe(self, plan, measured: float) -> None:
        """Add a measurement of the deployed model under `plan` (None: dense) and refit the calibration.

        The estimate follows the measurements: a non-decreasing fit of measured latency against the sum of
        table entries (`_work`; pool adjacent violators), linear between measurements; beyond them, and for
        `channel_costs`, the slope of the least-squares line through all of them (`scale`). Where the plans' MACs
        order the measurements better than their table sums (fewer pairs in the opposite order), the fit is against
        MACs: tables measured under heavy load, or layers that run otherwise alone than in the deployed model (a
        one-channel convolution, slow in eager PyTorch), can put a narrow plan above a wide one.
        """
        self.observed.append((plan, float(measured)))
        if len(self.observed) >= 3:
            ys = [y for _, y in self.observed]
            sums = _disorder([self._layers_latency(self.widths(p)) for p, _ in self.observed], ys)
            macs = _disorder([float(CostModel.count(self, p)["flops"]) for p, _ in self.observed], ys)
            if (macs < sums) != self.by_macs:
                log.warning(
                    "latency tables: their sums order the %d measured models with %d pairs the wrong way round, MACs with "
                    "%d: the estimate follows %s (delete %s to measure the tables again)", len(ys), sums, macs,
                    "MACs" if macs < sums else "the tables again", self.cache,
                )
            self.by_macs = macs < sums
        self.points = [(self._work(p), y) for p, y in self.observed]
        xs, ys = zip(*self.points)
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        self.scale = sum((x - mean_x) * (y - mean_y) for x, y in self.points) / spread if spread > 0 else 0.0
        if not self.scale > 0:  # one point, or noise swamped the difference: the tables scaled to the dense model
            self.scale, mean_x, mean_y = self.points[0][1] / self.points[0][0], *self.points[0]
        self.overhead = mean_y - self.scale * mean_x
        blocks: list[list[float]] = []  # [sum of x, sum of y, count] of pooled measurements
        for x, y in sorted(self.points):
            blocks.append([x, y, 1])
            while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
                x2, y2, n2 = blocks.pop()
                blocks[-1] = [blocks[-1][0] + x2, blocks[-1][1] + y2, blocks[-1][2] + n2]
        self.fit = [(bx / n, by / n) for bx, by, n in blocks]

    def _work(self, plan) -> float:
        """What the calibration maps to latency: the plan's sum of table entries (its MACs where the tables are out of
        order)."""
        return float(CostModel.count(self, plan)["flops"]) if self.by_macs else self._layers_latency(self.widths(plan))

    def calibrated(self, layers: float) -> float:
        """Estimated latency (ms) of the deployed model whose work (`_work`) is `layers`."""
        fit = self.fit
        if layers <= fit[0][0]:
            return max(0.0, fit[0][1] + self.scale * (layers - fit[0][0]))
        if layers >= fit[-1][0]:
            return fit[-1][1] + self.scale * (layers - fit[-1][0])
        hi = next(i for i, (x, _) in enumerate(fit) if x >= layers)
        (x0, y0), (x1, y1) = fit[hi - 1], fit[hi]
        return y1 if x1 == x0 else y0 + (y1 - y0) * (layers - x0) / (x1 - x0)

    def _machine_key(self) -> str:
        import hashlib
        import platform

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine()
        # "fastest": tables of fastest calls; those of median calls, measured before, are not read.
        key = f"{name}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{self.device.type}|b{self.batch_size}|fastest"
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    @staticmethod
    def _layer_key(module: nn.Module, shape: tuple[int, ...]) -> str:
        if isinstance(module, nn.Linear):
            return f"linear|{module.in_features}|{module.out_features}|{shape}"
        return (
            f"conv|{module.in_channels}|{module.out_channels}|{module.kernel_size}|{module.stride}|{module.padding}|"
            f"{module.dilation}|{module.groups}|{shape}"
        )

    @staticmethod
    def _points(size: int, variable: bool, grid: int, round_to: int = 1) -> list[int]:
        """Channel counts a table measures: `grid` steps up to `size`, on multiples of `round_to` (the counts a plan can keep)."""
        if not variable:
            return [size]
        step = max(1, int(round_to))
        return sorted({min(size, step), size, *(min(size, step * math.ceil(size * k / grid / step)) for k in range(1, grid))})

    def _probe(self, module: nn.Module, shape: tuple[int, ...], cin: int, cout: int) -> float:
        """Measured latency of a standalone copy of the layer with `cin` inputs and `cout` outputs."""
        if isinstance(module, nn.Linear):
            layer: nn.Module = nn.Linear(cin, cout)
            x_shape = (*shape[:-1], cin)
        else:
            if module.groups == module.in_channels > 1:
                # Depthwise: its inputs follow its outputs (the plan counts the outputs only).
                groups = cin = cout // (module.out_channels // module.in_channels)
            else:
                groups = math.gcd(module.groups, cin, cout)
            # A deployed convolution has a bias (its BatchNorm folded in).
            layer = nn.Conv2d(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation, groups, bias=True)
            x_shape = (cin, *shape[1:])
        self.probes += 1
        layer = layer.to(self.device).eval()
        return float(self.probe_timer(layer, torch.randn(self.batch_size, *x_shape, device=self.device)))

    def channel_costs(self, groups: list) -> dict[str, float]:
        """Milliseconds one channel of each group costs: the tables' saving when the group alone is halved, per channel.

        A group whose channels cost nothing measurable (within the tables' noise) gets 1% of the mean cost.
        """
        from prunelab.structure import ChannelPlan

        dense = self._work(None)
        costs = {}
        for g in groups:
            kept = keep_count(g.size // 2, g.size, 1, g.unit, g.multiple)
            if kept == g.size:
                costs[g.name] = 0.0
                continue
            halved = ChannelPlan({g.name: list(range(kept))}, {g.name: g.size})
            costs[g.name] = self.scale * (dense - self._work(halved)) / (g.size - kept)
        positive = [c for c in costs.values() if c > 0]
        floor = 0.01 * sum(positive) / len(positive) if positive else 1.0
        return {name: max(cost, floor) for name, cost in costs.items()}

    def _layers_latency(self, widths: list[tuple[int, int]]) -> float:
        return sum(
            _interpolate(ins, inp, lambda i: _interpolate(outs, out, lambda o: table[f"{i},{o}"]))
            for (ins, outs, table), (inp, out) in zip(self.tables, widths)
        )

    def count(self, plan) -> dict[str, float]:
        """Estimated latency (ms) of the model with the plan applied, with FLOPs and parameters."""
        counts = super().count(plan)
        counts["latency"] = self.calibrated(self._work(plan))
        return counts


def _disorder(xs: list[float], ys: list[float]) -> int:
    """Pairs that `xs` and `ys` order the opposite way round."""
    return sum((xs[i] - xs[j]) * (ys[i] - ys[j]) < 0 for i in range(len(xs)) for j in range(i))


def _interpolate(points: list[int], x: float, value) -> float:
    """Piecewise-linear interpolation of `value` (a function of the grid points) at x."""
    if len(points) == 1:
        return value(points[0])
    hi = next((i for i, p in enumerate(points) if p >= x), len(points) - 1)
    lo = max(0, hi - 1)
    if points[hi] == x or lo == hi:
        return value(points[hi])
    weight = (x - points[lo]) / (points[hi] - points[lo])
    return (1 - weight) * value(points[lo]) + weight * value(points[hi])


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
    count (`ChannelGroup.multiple`); both are read from the model when not given. Returns the plan and the ratio it achieves, as
    counted on the built model. Metric "latency" estimates candidates with a `LatencyModel` (built with
    the `latency` keyword arguments: batch_size, device, format, cache_dir, timer, rounds) and judges the
    built model by its timing beside the dense model (`_search_latency`). Its `ranking` "per_ms" ranks channels by score per millisecond of their group
    (`LatencyModel.channel_costs`: the greedy solution of HALP's latency knapsack, one cost per group),
    "importance" (default) by score alone, as the FLOPs search does. Per millisecond needs scores on one
    scale across groups (a loss change, as HALP's Taylor scores): with filter-L1 on a pretrained ResNet-56
    it cut two residual streams to one channel (residual streams are read by every block of their stage,
    so each of their channels costs the most) and fine-tuning did not recover (10% accuracy; measured).
    """
    import copy

    from prunelab.structure import apply_channel_plan, channel_groups

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
        return _search_latency(model, costs, normalised, target, input_shape, tolerance, iterations, round_to, units, multiples, blocks, dense)
    smallest = estimated(plan_by_threshold(normalised, float("inf"), round_to, units, multiples, blocks))
    if smallest > target * (1 + tolerance):
        raise BudgetError(
            f"{metric} budget {target:.4g} cannot be met: keeping a single channel or unit (round_to={round_to}) in "
            f"every prunable group still leaves {smallest:.4g} of the dense {metric}"
        )
    aim = target
    for _ in range(5):
        plan = _bisect(normalised, aim, estimated, tolerance * target / aim, iterations, round_to, units, multiples, blocks, metric)
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


def _search_latency(model, costs, normalised, target, input_shape, tolerance, iterations, round_to, units, multiples, blocks, dense):
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

    from prunelab.structure import apply_channel_plan

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
            "latency search, %s (estimated %.4f): %s beside the dense model, round-to-round spread %.1f%%; %s", name,
            guess, beside.describe(), 100 * beside.spread,
            "accepted" if accepted else f"off the target {target:.4g} by more than {tolerance:.2%}",
        )
        if accepted:
            log.info("latency search: %d plan(s) measured in %.0f s, %s", len(measured), time.perf_counter() - began, noise())
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
                "%.4f, is measured instead", why, 100 * band, aim, guess,
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
    estimate, ratio = min(points, key=lambda p: abs(p[1] - target)) if under and over else max(under) if under else min(over)
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
                "channel in score order to %.4g", 100 * tolerance, metric, target, best[1], ratio,
            )
            return plan
        best = (plan, ratio)
    closest = f"closest under budget: {best[1]:.4g}, completed channel by channel" if best else "no candidate was under budget"
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
            steps.append((float(ranked[name][min(counts[name] // units.get(name, 1), ranked[name].numel() - 1)]), name, count))
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
    from prunelab.structure import channel_groups

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
            n: keep_count(round(s.numel() * (1 - ratios.get(n, 0.0))), s.numel(), round_to, units.get(n, 1), multiples.get(n, 1))
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
                latency = {**budget_latency(budget), "cache_dir": budget.get("latency_cache"), "ranking": budget.get("latency_ranking", "importance"),
                           "rounds": int(budget.get("latency_rounds", 5))}
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


def unstructured_plan(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global"):
    """A MaskPlan removing exactly `sparsity` of the scored weights: the lowest scores go first.

    "global" ranks all weights together (exact to one weight overall); "layer" removes the same
    fraction from every tensor (exact to one weight per tensor). Ties break by position, so the
    result is deterministic.
    """
    from prunelab.structure import MaskPlan

    if not 0.0 <= sparsity < 1.0:
        raise BudgetError(f"budget.sparsity is the fraction of weights to remove, in [0, 1); got {sparsity}")
    if scope not in ("global", "layer"):
        raise BudgetError(f"budget.scope must be 'global' or 'layer', got {scope!r}")
    if scope == "layer":
        return MaskPlan({name: keep_top(s.detach().cpu(), s.numel() - round(sparsity * s.numel())) for name, s in scores.items()})
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
        first = ~prefer.flatten()[tied].to(top.device) if prefer is not None else torch.zeros_like(tied, dtype=torch.bool)
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
