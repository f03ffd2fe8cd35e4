"""What the config's schema cannot say, checked once the config is composed, before any data is loaded.

Types, choices and unknown keys are the schemas' (`prunelab.schema`): Hydra refuses them while composing.
Here: ranges, settings that exclude each other, files that must exist, a folder that must be writable,
and, once the model is built, the settings that must fit it (layer ratios, skipped layers).

Every check raises a `ConfigError` whose message names the setting, the value and how to fix it; the
`prunelab` command prints it as one line, `prunelab: error: ...`, and exits with code 2. Methods check
their own settings by raising `ConfigError` from their constructors, which the pipeline calls before any
data is loaded; budgets that cannot be met raise `BudgetError`, a `ConfigError`.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.backbones import create
from prunelab.budget import count_flops

# The error classes live in the leaf module `prunelab.errors`; importers of them from here keep working.
from prunelab.errors import ConfigError, NonFiniteError, PrunelabError, user_error  # noqa: F401
from prunelab.structure import PRUNABLE_TYPES
from prunelab.structure.layers import _stage_of, skipped


def _number(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _fraction(
    cfg: DictConfig, key: str, low: float, high: float, closed_low: bool, closed_high: bool, meaning: str
) -> None:
    value = _number(cfg, key)
    if value is None:
        return
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a number ({meaning})"
    )
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    _require(math.isfinite(value) and above and below, f"{key}={value} is out of range: {meaning}, in {interval}")


def _whole(cfg: DictConfig, key: str, minimum: int, meaning: str, allow_none: bool = True) -> None:
    value = _number(cfg, key)
    if value is None and allow_none:
        return
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{key}={value!r} must be a whole number >= {minimum} ({meaning})",
    )


def _existing(cfg: DictConfig, key: str, what: str) -> None:
    value = _number(cfg, key)
    if value:
        path = Path(str(value)).expanduser()
        _require(path.exists(), f"{key}={value}: no such file ({what}; looked at {path.resolve()})")


def _writable(cfg: DictConfig, key: str, what: str) -> None:
    """The folder at `key` exists as a writable folder, or can be made: its nearest existing parent is one."""
    value = _number(cfg, key)
    if not value:
        return
    path = Path(str(value)).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    _require(
        existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
        f"{key}={value}: cannot write there ({what}; {existing} is "
        f"{'not writable' if existing.is_dir() else 'a file, not a folder'})",
    )


# What a preset leaves for the command line to set (`???`), and how.
_TO_SET = {
    "backbone._target_": "backbone=custom builds a model class of your own: pass backbone._target_=my_pkg.MyNet",
    "dataset._target_": (
        "dataset=custom uses a LightningDataModule of your own: pass dataset._target_=my_pkg.MyDataModule"
    ),
    "dataset.root": (
        "pass dataset.root=DIR, the folder that holds the dataset "
        "(for image_folder: DIR/train/<class>/... and DIR/val/<class>/...)"
    ),
}


def check_config(cfg: DictConfig) -> None:
    """Check every setting that can be checked without data: ranges, sizes, paths, the method's own."""
    unset = sorted(OmegaConf.missing_keys(cfg))
    if unset:
        raise ConfigError(f"{unset[0]} is not set: {_TO_SET.get(unset[0], f'pass {unset[0]}=<value>')}")
    _fraction(cfg, "budget.flops", 0, 1, False, True, "the fraction of the dense FLOPs to keep")
    _fraction(cfg, "budget.params", 0, 1, False, True, "the fraction of the dense parameters to keep")
    _fraction(cfg, "budget.sparsity", 0, 1, True, False, "the fraction of the prunable weights to remove")
    _fraction(cfg, "budget.tolerance", 0, math.inf, False, False, "the relative tolerance of a budget")
    _whole(cfg, "budget.iterations", 1, "binary-search steps of the threshold")
    _whole(cfg, "budget.round_to", 1, "kept channels are rounded up to a multiple of it")
    _fraction(cfg, "budget.latency", 0, 1, False, True, "the fraction of the dense model's measured latency to keep")
    _whole(cfg, "budget.latency_batch_size", 1, "the batch size the latency budget is measured at")
    _fraction(cfg, "budget.latency_tolerance", 0, 1, False, False, "the relative tolerance of the latency budget")
    if _number(cfg, "budget.latency") is not None:
        ranking = _number(cfg, "budget.latency_ranking")
        if (
            ranking == "per_ms"
            and str(_number(cfg, "method._target_") or "").endswith(".L1Filter")
            and _number(cfg, "method.normalize") is not False
        ):
            warnings.warn(
                "budget.latency_ranking=per_ms divides scores by each channel's latency across layers, but "
                "method.normalize=true scales every layer's L1 scores to its own maximum: on ResNet-56 this cut "
                "the residual streams to one channel; method=taylor gives scores on one scale (as HALP's)",
                stacklevel=2,
            )
        other = [k for k in ("flops", "params", "layer_ratios") if _number(cfg, f"budget.{k}") is not None]
        _require(
            not other,
            f"budget.latency and budget.{other[0] if other else ''} are both set: a structured budget is one of them",
        )
    _whole(cfg, "trainer.max_epochs", 0, "epochs of a training stage")
    for node in ("pretrain", "retrain"):
        _whole(cfg, f"{node}.epochs", 0, f"epochs of the {node} stage")
        _fraction(cfg, f"{node}.lr", 0, math.inf, False, False, "a learning rate")
    _whole(cfg, "retrain.rewind_iteration", 0, "the training iteration rewinding returns to; 0 = initialisation")
    _fraction(cfg, "retrain.max_factor", 0, math.inf, False, False, "the cap of Scratch-B's epoch factor")
    _fraction(cfg, "optimizer.lr", 0, math.inf, False, False, "the learning rate")
    _fraction(cfg, "label_smoothing", 0, 1, True, False, "label smoothing")
    _whole(cfg, "checkpoint_every_n_steps", 1, "optimizer steps between mid-epoch checkpoints")
    _whole(cfg, "bn_recalibration.batches", -1, "training batches for BN re-estimation, -1 = all, 0 = off", False)
    # A datamodule of the user's own (dataset=custom) may have no batch size; prunelab's always have one.
    _whole(
        cfg, "dataset.batch_size", 1, "images per training batch", "batch_size" not in (_number(cfg, "dataset") or {})
    )
    _whole(cfg, "dataset.eval_batch_size", 1, "images per evaluation batch")
    _whole(cfg, "dataset.num_workers", 0, "data-loader worker processes")
    _whole(cfg, "dataset.val_size", 0, "training images held out for validation")
    _whole(cfg, "dataset.subset", 1, "the first N training images")
    _whole(cfg, "latency.warmup", 0, "untimed calls before a latency measurement")
    _whole(cfg, "latency.repeats", 1, "timed calls of a latency measurement")
    _whole(cfg, "latency.rounds", 1, "interleaved rounds in which the final and the dense model are timed")
    # After latency.rounds, which it defaults to: a bad value is named where it was set.
    _whole(cfg, "budget.latency_rounds", 1, "interleaved rounds a latency-budget candidate is first timed in")
    _fraction(
        cfg, "latency.max_seconds", 0, math.inf, False, False, "the seconds after which a latency measurement stops"
    )
    for batch in _number(cfg, "latency.batch_sizes") or []:
        _require(
            isinstance(batch, int) and batch >= 1,
            f"latency.batch_sizes has {batch!r}: batch sizes are whole numbers >= 1",
        )
    _fraction(cfg, "backbone.width", 0, math.inf, False, False, "the channel multiplier of the backbone")
    _existing(cfg, "backbone.pretrained", "the checkpoint to start from")
    _existing(cfg, "method.init_from", "the checkpoint the method starts from")
    _writable(cfg, "paths.output_root", "where runs are written (PRUNELAB_OUTPUTS)")
    objective = _number(cfg, "objective")
    _require(
        objective is None or "test" not in str(objective).split("/"),
        f"objective={objective}: sweeps must not tune on the test set; use a validation metric such as val/acc",
    )
    ratios = _number(cfg, "budget.layer_ratios")
    if ratios:
        _check_layer_ratio_syntax(list(ratios))


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*:\s*([0-9.eE+-]+)\s*$")


def _check_layer_ratio_syntax(spec: list) -> None:
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in spec):
        bad = [r for r in spec if not 0.0 <= r < 1.0]
        if bad:
            raise ConfigError(
                f"budget.layer_ratios={spec}: ratios are fractions of channels to remove, in [0, 1); got {bad[0]}"
            )
        return
    for item in spec:
        match = _RANGE.match(str(item))
        if match is None:
            raise ConfigError(
                f"budget.layer_ratios entry {item!r} is not 'a-b:ratio' or 'a:ratio' (layer indices, fraction to "
                "remove)"
            )
        first, last, ratio = int(match[1]), int(match[2] or match[1]), float(match[3])
        _require(first <= last, f"budget.layer_ratios entry {item!r}: the range {first}-{last} is reversed")
        _require(0.0 <= ratio < 1.0, f"budget.layer_ratios entry {item!r}: the ratio must be in [0, 1)")


def check_layer_ratios(spec: list, model: Any) -> None:
    """The layer-ratio list fits the model: one entry per stage, or index ranges inside its layers."""
    layers = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    stages = 1 + max(_stage_of(model).values(), default=-1)
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in spec):
        # The classifier's stage may be left out: its outputs are never pruned.
        _require(
            stages - 1 <= len(spec) <= stages,
            f"budget.layer_ratios has {len(spec)} entries, but the model has {stages} stages (its top-level "
            f"blocks with conv/linear layers): give {stages - 1} or {stages} ratios",
        )
        return
    for item in spec:
        match = _RANGE.match(str(item))
        last = int(match[2] or match[1])
        _require(
            last < len(layers),
            f"budget.layer_ratios entry {item!r} reaches layer {last}, but the model has {len(layers)} conv/linear "
            f"layers (indices 0-{len(layers) - 1})",
        )


def check_skip(patterns: list, model: Any) -> tuple[str, ...]:
    """`structure.skip` as a tuple, each entry a module name, a parent of one or a glob matching one."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not isinstance(pattern, str) or not any(skipped(name, (pattern,)) for name in names):
            raise ConfigError(
                f"structure.skip entry {pattern!r} names no layer of the model (module names such as "
                f"{names[0]!r}, their parents, or globs like 'blocks.*.attn')"
            )
    return tuple(patterns)


def check_variant(cfg: DictConfig, image_size: int) -> str | None:
    """The stem variant of a backbone that has one: following the dataset when `auto`, else as set.

    CIFAR stems keep 32- and 64-pixel inputs at full resolution; ImageNet stems downsample 128 pixels
    and more. An explicit choice against the dataset is allowed, with a warning naming its FLOPs.
    """
    variant = _number(cfg, "backbone.variant")
    if variant is None:
        return None
    natural = "imagenet" if image_size >= 128 else "cifar"
    if variant == "auto":
        return natural
    _require(variant in ("cifar", "imagenet"), f"backbone.variant={variant!r} must be auto, cifar or imagenet")
    if variant != natural:
        spec = {
            k: v
            for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items()
            if k not in ("_target_", "pretrained")
        }
        shape = (3, image_size, image_size)
        chosen, other = (count_flops(create(**{**spec, "variant": v}), shape) for v in (variant, natural))
        warnings.warn(
            f"backbone.variant={variant} on {image_size}-pixel images: {chosen / 1e6:,.1f}M MACs, against "
            f"{other / 1e6:,.1f}M for the {natural} variant this input size usually takes (backbone.variant=auto)",
            stacklevel=2,
        )
    return variant
