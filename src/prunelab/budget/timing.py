"""Timing models: a call's latency, interleaved rounds beside a reference, and the deployed form that is timed."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunelab.export import FORMATS, export_deployable, load_deployed

log = logging.getLogger(__name__)


def time_call(
    fn,
    x: torch.Tensor,
    warmup: int = 3,
    repeats: int = 10,
    seconds: float = 0.0,
    max_seconds: float | None = None,
    label: str = "",
    least: int = 3,
    quiet: bool = False,
    fastest: bool = False,
) -> float:
    """Median time in milliseconds of `fn(x)` under inference mode, after `warmup` calls (`fastest`: the fastest
    call's).

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
            if (len(times) >= repeats and sum(times) >= seconds * 1000.0) or (len(times) >= least and over()):
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
            "stops after %g s (latency.max_seconds)",
            f"{label} " if label else "",
            x.shape[0],
            len(times),
            warm,
            repeats,
            warmup,
            statistics.median(times) / 1000.0,
            max_seconds,
        )
    return min(times) if fastest else statistics.median(times)


@dataclass
class Beside:
    """A model's times (ms) taken in interleaved rounds with those of a reference (the dense model): reference, model,
    reference, model, ...

    Load on a shared machine comes and goes over seconds; within a round it slows both alike, so each round gives a
    ratio that the load barely moves, and the median of the rounds' ratios is the statistic that holds under load (a
    single round's, or the two fastest times' ratio, moves with whichever model a burst of load hit). `spread` is the
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
            out.update(
                {
                    "dense_ms": _median(self.reference),
                    "dense_ms_min": min(self.reference),
                    "dense_ms_max": max(self.reference),
                    "speedup": _median(self.speedups),
                    "speedup_min": self.speedups[0],
                    "speedup_max": self.speedups[-1],
                }
            )
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
                "(latency.max_seconds)",
                f"{label} " if label else "",
                x.shape[0],
                done,
                rounds,
                time.perf_counter() - began,
                max_seconds,
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
