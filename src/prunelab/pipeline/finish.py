"""The final figures of a run: the final model's size and latency beside the dense one's, the validation
metrics that sweepers optimise, and the check that every result is finite."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from prunelab.backbones import rebuild
from prunelab.budget import budget_latency, latency_beside, latency_device, measure
from prunelab.methods.base import Stage
from prunelab.structure import model_record
from prunelab.validate import NonFiniteError

log = logging.getLogger("prunelab")


def final_figures(
    cfg: DictConfig,
    model: nn.Module,
    dense: dict[str, float],
    dense_spec: dict | None,
    base: nn.Module | None,
    input_shape: tuple[int, ...],
) -> dict[str, Any]:
    """The final model's FLOPs, parameters and sparsity beside the dense model's, and, under a latency budget,
    its latency ratio to the dense architecture as the budget's search measures it."""
    final = measure(model, input_shape)
    figures = {
        "model/flops": final["flops"],
        "model/params": final["params"],
        "model/flops_ratio": final["flops"] / dense["flops"] if dense["flops"] else 1.0,
        "model/params_ratio": final["params"] / dense["params"] if dense["params"] else 1.0,
        "model/sparsity": final["sparsity"],
    }
    if cfg.budget.get("latency") is not None:
        # What the latency budget asked for, as the search measures it: the final and the dense architecture timed
        # in interleaved rounds, the median of the rounds' ratios, with the lowest and highest round's and the spread.
        measured, rounds = budget_latency(cfg.budget), int(cfg.budget.get("latency_rounds", 5))
        # Rounds of at least 5 calls and 0.2 s each, as the search times its candidates.
        beside = latency_beside(
            model,
            _dense_model(dense_spec, base),
            input_shape,
            (measured["batch_size"],),
            measured["device"],
            measured["format"],
            rounds=rounds,
            repeats=5 * rounds,
            seconds=0.2 * rounds,
        )[measured["batch_size"]]
        figures.update(
            {
                "model/latency_ratio": round(beside.ratio, 4),
                "model/latency_ratio_min": round(beside.ratios[0], 4),
                "model/latency_ratio_max": round(beside.ratios[-1], 4),
                "model/latency_ratio_spread": round(beside.spread, 4),
            }
        )
        log.info(
            "latency budget %g: the final model, %s beside the dense model, round-to-round spread %.1f%%",
            float(cfg.budget.latency),
            beside.describe(),
            100 * beside.spread,
        )
    return figures


def final_validation(stages: list[Stage], summary: dict[str, Any], retrain_on_val: bool = False) -> dict[str, float]:
    """`val/acc` and `val/loss`: the validation metrics of the last training stage, what sweepers optimise.

    A retraining stage that trains on the validation images (`retrain.with_val`) validates on the test
    set, so it is passed over: sweepers never see a test metric under the name `val/acc`.
    """
    kinds = ("fit",) if retrain_on_val else ("fit", "retrain")
    found = {}
    for stage in stages:
        for metric in ("acc", "loss"):
            value = summary.get(f"{stage.tag}/val/{metric}")
            if value is not None and stage.kind in kinds:
                found[f"val/{metric}"] = value
    return found


def check_finite(summary: dict[str, Any]) -> None:
    """A summary is strict JSON: a NaN or infinite result stops the run instead of being reported."""
    bad = sorted(k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise NonFiniteError(
            f"the run ended with non-finite results ({', '.join(bad)}); nothing was written as complete"
        )


def latency_figures(
    cfg: DictConfig,
    model: nn.Module,
    dense_spec: dict | None,
    input_shape: tuple[int, ...],
    fmt: str,
    base: nn.Module | None = None,
) -> dict[str, Any]:
    """Latency of the final model beside that of the dense architecture, measured in the same run.

    Eager (`model/latency_b<N>_ms`) and as deployed in the export format (`model/deployed_latency_b<N>_ms`:
    the exported file reloaded, a frozen TorchScript one also through `torch.jit.optimize_for_inference`),
    with the format, device and thread count they were taken with. The two models are timed in
    `latency.rounds` interleaved rounds (dense, final, dense, final, ...): each latency is the median
    over rounds, with its fastest and slowest round (`_ms_min`, `_ms_max`); each speedup the median of
    the rounds' dense / final, with its lowest and highest round's (`_min`, `_max`) and the
    round-to-round spread of the ratio (`_spread`), the noise the measurement saw.
    """
    lat = cfg.get("latency")
    if not lat or not lat.batch_sizes:
        return {}
    # Each round of a model lasts at least 0.05 s: a round of two calls of a few milliseconds is over before a burst
    # of load passes (speedups of 0.6-11x between such rounds on a loaded 2-core machine).
    rounds = int(lat.get("rounds", 1))
    kwargs = {
        "batch_sizes": tuple(lat.batch_sizes),
        "device": lat.device,
        "warmup": lat.warmup,
        "repeats": lat.repeats,
        "rounds": rounds,
        "seconds": 0.05 * rounds,
        "max_seconds": lat.get("max_seconds"),
    }
    # An architecture no plan changed is the dense one: timing it twice would only measure noise.
    changed = model_record(model).plans or model_record(model).spec != dense_spec
    dense_model = _dense_model(dense_spec, base) if changed else None
    out: dict[str, Any] = {
        "latency/format": fmt,
        "latency/threads": torch.get_num_threads(),
        "latency/device": str(latency_device(lat.device)),
        "latency/rounds": kwargs["rounds"],
    }
    # On a CPU a large model at batch 64 takes seconds a call (a 167M-parameter ViT at 224 px), minutes in all.
    log.info(
        "timing the %s model, eager and as %s, at batch sizes %s in %d interleaved rounds (latency.batch_sizes=[] "
        "skips this)",
        "final and the dense" if changed else "final",
        fmt,
        list(lat.batch_sizes),
        kwargs["rounds"],
    )
    for prefix, form in (("", "eager"), ("deployed_", fmt)):
        label = f"{'final and dense' if changed else 'final'} model, {form},"
        for b, beside in latency_beside(model, dense_model, input_shape, format=form, label=label, **kwargs).items():
            figures = beside.figures()
            key = f"{prefix}latency_b{b}_ms"
            for suffix in ("", "_min", "_max"):
                out[f"model/{key}{suffix}"] = figures[f"ms{suffix}"]
                out[f"dense/{key}{suffix}"] = figures.get(f"dense_ms{suffix}", figures[f"ms{suffix}"])
                out[f"model/{prefix}speedup_b{b}{suffix}"] = figures.get(f"speedup{suffix}", 1.0)
            out[f"model/{prefix}speedup_b{b}_spread"] = figures["spread"] if changed else 0.0
            if changed:
                log.info(
                    "%s batch %d: %s, round-to-round spread %.1f%%", label, b, beside.describe(), 100 * beside.spread
                )
    return out


def _dense_model(spec: dict | None, base: nn.Module | None) -> nn.Module:
    """A dense model of the run's architecture to time beside the final one: built from the backbone's
    spec, or a copy of the model given from Python."""
    return rebuild(spec) if spec is not None else copy.deepcopy(base)
