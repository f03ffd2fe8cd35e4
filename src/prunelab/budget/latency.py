"""Latency of a pruned model estimated from a plan: per-layer tables calibrated on the deployed model."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from prunelab.budget import timing
from prunelab.budget.cost import CostModel
from prunelab.budget.plans import keep_count, plan_by_counts
from prunelab.budget.timing import Beside, deployed, latency_device, time_rounds
from prunelab.io import write_json
from prunelab.structure import ChannelPlan, apply_channel_plan

log = logging.getLogger(__name__)


class LatencyModel(CostModel):
    """Latency of a pruned model estimated from a plan, the way NetAdapt and HALP do it.

    Each conv/linear layer gets a table of its latency over kept input and output channels, measured
    on the device at the batch size on a standalone layer of the same shape (eager, its fastest call; a grid of `grid` +
    1 counts per side that the plan can change, on multiples of `round_to`, bilinear in between; a depthwise
    convolution's inputs follow its outputs). Tables are keyed by the layer's shape, the device, threads, torch version
    and batch, and kept in `cache_dir`, so that they are measured once per machine. The deployed model
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

        super().__init__(model, groups, input_shape)
        self.input_shape = tuple(input_shape)
        self.batch_size, self.format, self.device = int(batch_size), format, latency_device(device)
        self.timer = timer or (lambda fn, x: timing.time_call(fn, x, warmup=3, repeats=20, seconds=0.3))
        # A layer alone takes a few milliseconds, less than a time slice of the scheduler: on a loaded machine most of
        # its calls wait for one (medians of 10-44 ms for a 16-to-16 convolution at batch 64, in no order of width), the
        # fastest call does not. The tables only give the layers' shares, which the deployed model calibrates.
        self.probe_timer = timer or (
            lambda fn, x: timing.time_call(fn, x, warmup=3, repeats=20, seconds=0.3, fastest=True)
        )
        # A deployed model is timed in rounds beside the dense one: warmed up in the first, then at least 5 calls and
        # 0.2 s a round (many short rounds follow the machine's load better than a few long ones).
        self.first_timer = timer or (
            lambda fn, x: timing.time_call(fn, x, warmup=3, repeats=5, seconds=0.2, quiet=True)
        )
        self.round_timer = timer or (
            lambda fn, x: timing.time_call(fn, x, warmup=0, repeats=5, seconds=0.2, quiet=True)
        )
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
            "timed in 3 rounds beside it: ratios %s, round-to-round spread %s",
            self.dense["latency"],
            self.format,
            self.batch_size,
            ", ".join(f"{b.ratio:.3f}" for b in calibration),
            ", ".join(f"{b.spread:.1%}" for b in calibration),
        )

    def beside_dense(self, model: nn.Module, rounds: int | None = None) -> Beside:
        """The deployed model timed in `rounds` (default: the model's `rounds`) interleaved with the dense model."""
        return self._rounds(deployed(model, self.input_shape, self.format, self.device), rounds or self.rounds, True)

    def _rounds(self, net, rounds: int, first: bool) -> Beside:
        dense, timed = time_rounds(
            [self._dense_net, net], self._x, rounds, self.round_timer, self.first_timer if first else None
        )
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
            return (low <= lo and hi <= high) or hi < low or lo > high or hi - lo <= tolerance * beside.ratio

        while not settled() and beside.rounds < most:
            beside.extend(self._rounds(net, min(self.rounds, most - beside.rounds), False))
        if not settled():
            lo, hi = beside.interval()
            log.info(
                "latency search: still unclear after %d interleaved rounds (the bound, 3 x latency_rounds): the median "
                "ratio's bounds %.4f-%.4f straddle an edge of %.4f-%.4f and are wider than the %.2f%% tolerance "
                "(round-to-round spread %.1f%%); the median %.4f decides",
                beside.rounds,
                lo,
                hi,
                low,
                high,
                100 * tolerance,
                100 * beside.spread,
                beside.ratio,
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
                    "latency tables: their sums order the %d measured models with %d pairs the wrong way round, MACs "
                    "with %d: the estimate follows %s (delete %s to measure the tables again)",
                    len(ys),
                    sums,
                    macs,
                    "MACs" if macs < sums else "the tables again",
                    self.cache,
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

        name = (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine()
        )
        # "fastest": tables of fastest calls; those of median calls, measured before, are not read.
        key = (
            f"{name}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{self.device.type}"
            f"|b{self.batch_size}|fastest"
        )
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
        """Channel counts a table measures: `grid` steps up to `size`, on multiples of `round_to` (the counts a plan can
        keep)."""
        if not variable:
            return [size]
        step = max(1, int(round_to))
        return sorted(
            {min(size, step), size, *(min(size, step * math.ceil(size * k / grid / step)) for k in range(1, grid))}
        )

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
            layer = nn.Conv2d(
                cin, cout, module.kernel_size, module.stride, module.padding, module.dilation, groups, bias=True
            )
            x_shape = (cin, *shape[1:])
        self.probes += 1
        layer = layer.to(self.device).eval()
        return float(self.probe_timer(layer, torch.randn(self.batch_size, *x_shape, device=self.device)))

    def channel_costs(self, groups: list) -> dict[str, float]:
        """Milliseconds one channel of each group costs: the tables' saving when the group alone is halved, per channel.

        A group whose channels cost nothing measurable (within the tables' noise) gets 1% of the mean cost.
        """
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
            # B023: _interpolate calls the function at once, in this very iteration.
            _interpolate(ins, inp, lambda i: _interpolate(outs, out, lambda o: table[f"{i},{o}"]))  # noqa: B023
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
