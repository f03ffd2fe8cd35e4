"""Runs a method's stages in order; a stage whose output exists is skipped, so a killed run resumes.

A method's stages may hold `Rounds`, blocks repeated for rounds (train -> prune -> rewind); they are
expanded here into one flat list, in which every stage has its own directory (`stages/<i>-<name>`,
or `stages/r<round>-<j>-<name>` inside a round) and is skipped when its `done.json` exists. Each
completed stage leaves its model, the method's state and its metrics, so a resumed run continues
with exactly what the interrupted one had.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab import dashboard, distributed, structure
from prunelab.backbones import from_target, rebuild
from prunelab.budget import budget_latency, count_flops, deployed_latency, latency_beside, latency_device, measure, scratch_b_epochs
from prunelab.data import adopt
from prunelab.export import FORMATS, export_deployable, load_model, save_model
from prunelab.io import RunLock, atomic_write, save_torch, write_json, write_text
from prunelab.lit import PruneLitModule
from prunelab.methods.base import MethodContext, PruningMethod, Rounds, Stage
from prunelab.report import round_rows
from prunelab.structure import model_record
from prunelab.targets import call
from prunelab.validate import (
    ConfigError,
    NonFiniteError,
    check_config,
    check_layer_ratios,
    check_skip,
    check_variant,
    user_error,
)

log = logging.getLogger("prunelab")

# The `_target_` of prunelab's own backbones; any other is a class of the user's own.
CREATE = "prunelab.backbones.create"


class RunInterrupted(RuntimeError):
    """A stage stopped before it completed (e.g. Ctrl-C); its output is not marked as done."""


class Rewind:
    """The one owner of rewinding: the weights of training iteration k, saved once per run.

    k = 0 is the model the method starts from (its initialisation, or the loaded checkpoint), saved
    before any stage; k > 0 is saved by a callback when the first fit stage reaches its k-th optimizer
    step (Frankle et al.'s late rewinding). `restore` gives those weights the current model's
    structure (its channel plans, replayed) and masks; the next fit stage builds a fresh optimizer.
    """

    def __init__(self, path: Path, iteration: int, base: nn.Module | None = None) -> None:
        if iteration < 0:
            raise ValueError(f"retrain.rewind_iteration must be >= 0, got {iteration}")
        self.path = path
        self.iteration = int(iteration)
        # A model given from Python is rebuilt on a copy of it (`load_model`'s `base`).
        self.base = base

    def save_initial(self, model: nn.Module) -> None:
        if self.iteration == 0 and not self.path.exists():
            save_model(model, self.path)

    def callbacks(self) -> list[Callback]:
        """What a fit stage needs to take the snapshot at iteration k (nothing once it exists)."""
        if self.iteration == 0 or self.path.exists():
            return []
        return [_RewindSnapshot(self.path, self.iteration)]

    def restore(self, model: nn.Module) -> nn.Module:
        """The saved weights of iteration k under `model`'s channel plans and masks."""
        if not self.path.exists():
            raise RuntimeError(
                f"rewinding needs the weights of training iteration {self.iteration} (retrain.rewind_iteration), "
                f"but {self.path} was never written: training ended before that iteration"
            )
        current = model_record(model)
        rewound = load_model(self.path, base=self.base)
        for plan in current.plans:
            structure.apply_channel_plan(rewound, plan, current.input_shape)
        if current.masks is not None:
            structure.zero_masked_(rewound, current.masks)
            model_record(rewound).masks = current.masks
        model_record(rewound).input_shape = current.input_shape
        return rewound


# The key under which a fit runner hands the time of earlier invocations of its stage to `_run_stage`.
_EARLIER = "_earlier_s"


class _StageClock(Callback):
    """Keeps a fit stage's working time in its checkpoints, so a resumed stage reports all of it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.earlier = 0.0

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.earlier + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.earlier = float(state.get("seconds", 0.0))


class _RewindSnapshot(Callback):
    """Saves the weights at training iteration k, for rewinding."""

    def __init__(self, path: Path, iteration: int):
        self.path = path
        self.iteration = iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.iteration and not self.path.exists() and trainer.is_global_zero:
            # The weights themselves: a method's masks attached for training (relaxed ones) are not folded in.
            snapshot = copy.deepcopy(pl_module.model)
            structure.detach_masks(snapshot, fold=False)
            save_model(snapshot, self.path)


@dataclass
class Context:
    """What the stages of one experiment share (the pipeline's own; methods see a `MethodContext`)."""

    cfg: DictConfig
    run_dir: Path
    datamodule: L.LightningDataModule
    method: PruningMethod
    input_shape: tuple[int, int, int]
    dense: dict[str, float] = field(default_factory=dict)
    logger: Any = None
    callbacks: list[Callback] = field(default_factory=list)
    rewind: Rewind | None = None
    rounds: int = 0
    # The model given from Python as it came (None when built from `backbone`): saved models are rebuilt on it.
    base: nn.Module | None = None

    @property
    def budget(self) -> DictConfig:
        return self.cfg.budget

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    def for_method(self, model: nn.Module, stage: Stage | None = None) -> MethodContext:
        """The narrow view a method gets of the experiment, with the model's current masks and plans."""
        info = model_record(model)
        return MethodContext(
            config=self.cfg.method,
            budget=self.cfg.budget,
            data=self.datamodule,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            seed=int(self.cfg.seed),
            run_dir=self.run_dir,
            dense=self.dense,
            # A model given from Python starts from its own weights, as a loaded checkpoint does.
            pretrained=bool(self.cfg.backbone.get("pretrained")) or self.base is not None,
            logger=self.logger,
            round=stage.round if stage is not None else None,
            rounds=self.rounds,
            masks=info.masks,
            plans=list(info.plans),
            stage=stage,
        )


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    callbacks: list[Callback] | None = None,
    model: nn.Module | None = None,
    datamodule: L.LightningDataModule | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment described by `cfg` in `run_dir`; returns the summary.

    The config is checked before anything is built, and the run directory is locked for this process
    (a second process on it stops at once). `model` and `datamodule` (`prunelab.prune`: the user's own,
    with the datamodule's `input_shape` and `splits`) replace what `backbone` and `dataset` would build;
    such a model is changed in place (pruned, trained), and the final one is saved as `model.pt` in
    `run_dir` (`load_model` rebuilds it on an unpruned instance of its class, `base`).
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Only global rank 0 holds the lock (DDP ranks > 0, launched by Lightning or as SLURM tasks, share it).
    if rank_zero_only.rank != 0:
        return _run(cfg, run_dir, callbacks, model, datamodule)
    with RunLock(run_dir):
        return _run(cfg, run_dir, callbacks, model, datamodule)


# The settings that do not decide a run's result, left out of the record of what a run directory holds
# (`EXPERIMENT_FILE`): a key and everything under it. Changing one of them and running the same command
# again resumes the run; any other difference is refused. They only say where things are, how a run is
# shown or logged, or how fast and on what it computes:
NOT_DECIDING = (
    # What is printed and where metrics are logged.
    "quiet",
    "verbose_libraries",
    "logger",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    # Where the data, the outputs and the latency tables are (the run directory itself included): data
    # moved to a node's local disk is the same data.
    "paths",
    "dataset.root",
    "dataset.download",
    "budget.latency_cache",
    # Data-loader processes: each sample's order and augmentation are functions of the seed, the epoch
    # and the sample, not of the worker that loads it.
    "dataset.num_workers",
    # The devices one global batch (`dataset.batch_size`) is spread over, and how: a killed run may
    # resume on another number of GPUs or nodes.
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    # Speed options that compute the same model up to rounding.
    "trainer.channels_last",
    "trainer.compile",
    # How often a fit stage saves a checkpoint: a resumed run ends as one that never stopped.
    "checkpoint_every_n_steps",
    # The export and the final latency timing are redone by every invocation from the final model;
    # no stage keeps anything of them.
    "export",
    "latency",
    # What Hydra's sweepers are given and the paper result the reports draw beside the runs.
    "objective",
    "paper",
    # Hydra's own settings (the job's config leaves them out; a caller's config may hold them).
    "hydra",
)
# The record of the deciding settings in the run directory, written by the command that starts the run.
EXPERIMENT_FILE = "experiment.json"


def experiment_record(cfg: DictConfig) -> dict[str, Any]:
    """The settings of `cfg` that decide a run's result, as flat `a.b.c` keys of JSON values.

    The settings of a latency budget (`budget.latency_*`) decide nothing while `budget.latency` is
    null; they default to the export format and the timing device, which do not decide either.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if any(prefix == key or prefix.startswith(key + ".") for key in NOT_DECIDING):
            return
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, float) and not math.isfinite(node):
            flat[prefix] = str(node)
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    if flat.get("budget.latency") is None:
        flat = {k: v for k, v in flat.items() if not k.startswith("budget.latency_")}
    # A JSON round trip gives the values the saved record reads back as (tuples as lists, paths as text).
    return json.loads(json.dumps(flat, default=str))


def _unset(value: Any) -> bool:
    """A value that means "off", which is what a setting added to prunelab defaults to (it changes nothing)."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def experiment_differences(held: dict[str, Any], asked: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The deciding settings in which two records differ: (key, value held, value asked).

    A key that only one record has (a setting that a later version of prunelab added or removed, or
    another method's own) counts only when it is set there: a new setting at its "off" default changes
    nothing, so a run started before it existed still resumes.
    """
    missing = object()
    found = []
    for key in [*asked, *(k for k in held if k not in asked)]:
        here, wanted = held.get(key, missing), asked.get(key, missing)
        if here is missing and _unset(wanted) or wanted is missing and _unset(here):
            continue
        if here is missing or wanted is missing or here != wanted:
            found.append((key, here if here is not missing else "absent", wanted if wanted is not missing else "absent"))
    return found


def _claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse a run directory that holds another experiment's results; record this one's settings there.

    The record is written when the directory holds none (a new directory, one made before records
    existed, or one whose earlier command stopped before computing anything, e.g. at a setting refused
    after the record was written); then this command's settings replace it.
    """
    path = run_dir / EXPERIMENT_FILE
    asked = experiment_record(cfg)
    held = json.loads(path.read_text()) if path.exists() else None
    if held == asked:
        return
    if held is not None and _holds_results(run_dir):
        differences = experiment_differences(held, asked)
        if differences:
            shown = ", ".join(f"{key} ({_show(here)} here, {_show(wanted)} asked)" for key, here, wanted in differences[:8])
            more = f", and {len(differences) - 8} more" if len(differences) > 8 else ""
            raise ConfigError(
                f"run directory {run_dir} holds another experiment: {shown}{more} (use another hydra.run.dir, "
                f"or delete {run_dir} to start over)"
            )
        # Only settings at their "off" value differ (a setting added since): the record takes them.
    write_json(path, asked)


def _holds_results(run_dir: Path) -> bool:
    """Whether a run directory holds anything computed: a stage's file, the rewind weights, the final model."""
    if any((run_dir / name).exists() for name in ("rewind.pt", "model.pt", "summary.json")):
        return True
    stages = run_dir / "stages"
    return stages.is_dir() and any(path.is_file() for path in stages.rglob("*"))


def _show(value: Any) -> str:
    """A setting's value as it is written on the command line, shortened past 60 characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, with a user error raised inside a constructor shown as itself, not Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        found = user_error(err)
        if found is not None:
            raise found from None
        missing = err.__cause__
        if isinstance(missing, FileNotFoundError):
            raise ConfigError(str(missing)) from None
        raise


def _run(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: list[Callback] | None,
    model: nn.Module | None = None,
    datamodule: L.LightningDataModule | None = None,
) -> dict[str, Any]:
    _quiet_logs(bool(cfg.get("quiet", False)), bool(cfg.get("verbose_libraries", False)), _hydra_verbose())
    _use_wandb_offline_without_key()
    # Every rank checks (ranks > 0 only read): a refused command stops before it writes or loads anything.
    _claim_run_dir(run_dir, cfg)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # The one place where the experiment's objects are built from the config (unless given from Python).
    if datamodule is None:
        datamodule = _dataset(cfg.dataset)
    try:
        # A LightningDataModule of the user's own class (`dataset._target_`) is used through its loaders.
        datamodule = adopt(datamodule, str(cfg.dataset.get("_target_", "")))
        datamodule.prepare_data()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    # A model given from Python, as it came: models of its class are rebuilt on a copy of it (`load_model`).
    base = copy.deepcopy(model) if model is not None else None
    if model is None:
        model = _backbone(cfg, datamodule.num_classes, tuple(datamodule.input_shape))
    if cfg.budget.get("layer_ratios"):
        check_layer_ratios(list(cfg.budget.layer_ratios), model)
    method = _build(cfg.method)
    stages = plan_stages(cfg, method, pretrained=base is not None)
    _check_data(stages, method, datamodule)
    prunes = any(s.kind == "prune" for s in stages)
    if method.budget_keys and prunes and all(cfg.budget.get(k) is None for k in method.budget_keys):
        wanted = " or ".join(f"budget.{k}" for k in method.budget_keys)
        raise ConfigError(f"{type(method).__name__} prunes to a budget: set {wanted}")
    input_shape = tuple(datamodule.input_shape)
    model_record(model).skip = check_skip(list(cfg.get("structure", {}).get("skip") or []), model)
    model_record(model).prune_embedding = bool(cfg.get("structure", {}).get("prune_embedding", False))
    model_record(model).prune_head_dim = bool(cfg.get("structure", {}).get("prune_head_dim", False))
    if prunes and "flops" in method.budget_keys and any(cfg.budget.get(k) is not None for k in ("flops", "params", "latency", "layer_ratios")):
        # The groups (and that they passed the check) are kept in the run directory: a resumed run skips both.
        if not structure.remember_groups(model, input_shape, run_dir / "groups.json"):
            structure.check_prunable(model, input_shape)
            structure.remember_groups(model, input_shape, run_dir / "groups.json", checked=True)
    logger = _build(cfg.logger, **dashboard.logger_options(cfg)) if cfg.get("logger") else None
    if logger is not None:
        logger.log_hyperparams(dashboard.flat_config(cfg))
    dirs = stage_dirs(stages)
    write_json(run_dir / "stages.json", [{"dir": d, "name": s.name, "kind": s.kind, "round": s.round} for s, d in zip(stages, dirs)])
    rewinds = any(s.kind == "rewind" or (s.kind == "retrain" and cfg.retrain.mode == "rewind") for s in stages)
    ctx = Context(
        cfg=cfg,
        run_dir=run_dir,
        datamodule=datamodule,
        method=method,
        input_shape=input_shape,
        logger=logger,
        callbacks=list(callbacks or []),
        rewind=Rewind(run_dir / "rewind.pt", cfg.retrain.rewind_iteration, base) if rewinds else None,
        rounds=max((s.round for s in stages if s.round is not None), default=0),
        base=base,
    )
    if ctx.rewind is not None and ctx.rewind.iteration > 0:
        _check_rewind_reachable(ctx, stages)
    model_record(model).input_shape = ctx.input_shape
    ctx.dense = measure(model, ctx.input_shape)
    if cfg.budget.get("latency") is not None:
        ctx.dense["latency"] = deployed_latency(model, ctx.input_shape, **budget_latency(cfg.budget))
    method.bind(ctx.for_method(model))
    # A model given from Python has no spec: its dense copy is `base`.
    dense_spec = dict(model_record(model).spec) if model_record(model).spec is not None else None
    model = method.initial_model(model)
    model_record(model).input_shape = ctx.input_shape
    if ctx.rewind is not None:
        ctx.rewind.save_initial(model)

    summary: dict[str, Any] = {"dense/flops": ctx.dense["flops"], "dense/params": ctx.dense["params"]}
    for index, (stage, directory) in enumerate(zip(stages, dirs)):
        closes_round = stage.round is not None and (index + 1 == len(stages) or stages[index + 1].round != stage.round)
        model, results = _run_stage(ctx, stage, run_dir / "stages" / directory, model, closes_round)
        summary.update(results)

    final = measure(model, ctx.input_shape)
    summary.update(
        {
            "model/flops": final["flops"],
            "model/params": final["params"],
            "model/flops_ratio": final["flops"] / ctx.dense["flops"] if ctx.dense["flops"] else 1.0,
            "model/params_ratio": final["params"] / ctx.dense["params"] if ctx.dense["params"] else 1.0,
            "model/sparsity": final["sparsity"],
        }
    )
    if cfg.budget.get("latency") is not None:
        # What the latency budget asked for, as the search measures it: the final and the dense architecture timed
        # in interleaved rounds, the median of the rounds' ratios, with the lowest and highest round's and the spread.
        measured, rounds = budget_latency(cfg.budget), int(cfg.budget.get("latency_rounds", 5))
        # Rounds of at least 5 calls and 0.2 s each, as the search times its candidates.
        beside = latency_beside(
            model, _dense_model(dense_spec, base), ctx.input_shape, (measured["batch_size"],), measured["device"], measured["format"],
            rounds=rounds, repeats=5 * rounds, seconds=0.2 * rounds,
        )[measured["batch_size"]]
        summary.update({"model/latency_ratio": round(beside.ratio, 4), "model/latency_ratio_min": round(beside.ratios[0], 4),
                        "model/latency_ratio_max": round(beside.ratios[-1], 4), "model/latency_ratio_spread": round(beside.spread, 4)})
        log.info("latency budget %g: the final model, %s beside the dense model, round-to-round spread %.1f%%",
                 float(cfg.budget.latency), beside.describe(), 100 * beside.spread)
    fmt = cfg.export.format
    summary.update(_latency(cfg, model, dense_spec, ctx.input_shape, fmt, base))
    summary.update(_final_validation(stages, summary, retrain_on_val=bool(cfg.retrain.get("with_val", False))))
    _check_finite(summary)
    if rank_zero_only.rank == 0:
        save_model(model, run_dir / "model.pt")
        export_deployable(model, run_dir / FORMATS[fmt], ctx.input_shape, fmt)
        write_json(run_dir / "summary.json", summary, sort_keys=True)
        dashboard.finish(logger, cfg, run_dir, summary)
        _print_summary(summary, run_dir)
    return summary


def _dataset(node: DictConfig) -> L.LightningDataModule:
    """The datamodule `dataset` describes: one of prunelab's, or a LightningDataModule of the user's own class
    (`dataset=custom dataset._target_=my_pkg.MyDataModule`), built from the node's keys (`targets.call`)."""
    if str(node.get("_target_")).startswith("prunelab."):
        return _build(node)
    # A preset's keys left in the node (`dataset._target_=...` without `dataset=custom`) say where to start.
    hint = "; start from dataset=custom to leave out the keys of prunelab's presets: dataset=custom dataset._target_={node._target_} +dataset.<argument>=<value>"
    return call(OmegaConf.to_container(node, resolve=True), "dataset", hint=hint if "val_size" in node else "")[0]


def _backbone(cfg: DictConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model `backbone` describes for the data: a prunelab backbone (`prunelab.backbones.create`), or a
    class of the user's own (`backbone=custom backbone._target_=my_pkg.MyNet`, see `backbones.from_target`)."""
    if cfg.backbone.get("_target_") != CREATE:
        return from_target(OmegaConf.to_container(cfg.backbone, resolve=True), num_classes, input_shape[0], input_shape)
    variant = check_variant(cfg, input_shape[-1])
    extra = {"variant": variant} if variant is not None else {}
    return _build(cfg.backbone, num_classes=num_classes, in_channels=input_shape[0], **extra)


def _check_rewind_reachable(ctx: Context, stages: list[Stage]) -> None:
    """Rewinding to iteration k needs a first training stage of at least k optimizer steps."""
    first = next((s for s in stages if s.kind in ("fit", "retrain")), None)
    k = ctx.rewind.iteration
    if first is None:
        raise ConfigError(f"retrain.rewind_iteration={k}: this run has no training stage to take iteration {k} from")
    if ctx.rewind.path.exists():
        return
    ctx.datamodule.setup("fit")
    batches = math.ceil(len(ctx.datamodule.train_dataloader(epoch=0).dataset) / ctx.datamodule.batch_size)
    limit = ctx.cfg.trainer.get("limit_train_batches")
    if limit is not None:
        batches = min(batches, int(limit)) if isinstance(limit, int) or limit > 1 else int(batches * limit)
    epochs = first.epochs if first.epochs is not None else ctx.cfg.trainer.max_epochs
    steps = batches * epochs if epochs >= 0 else math.inf
    if first.max_steps is not None:
        steps = min(steps, first.max_steps)
    if k > steps:
        raise ConfigError(
            f"retrain.rewind_iteration={k} is past the {steps} optimizer steps of the first training stage "
            f"({first.tag}: {epochs} epochs of {batches} batches); rewind to an iteration <= {steps}"
        )


def _check_data(stages: list[Stage], method: PruningMethod, datamodule: L.LightningDataModule) -> None:
    """Refuse, before any work, a stage or a method that needs data the datamodule does not hold.

    Training stages need "train", tests "test" (a datamodule lists what it holds in `splits`), and so
    does a method whose plan reads training batches (`PruningMethod.needs_training_data`).
    """
    held = getattr(datamodule, "splits", ("train", "val", "test"))
    needs = {"fit": "train", "retrain": "train", "recalibrate": "train", "test": "test"}
    for stage in stages:
        split = needs.get(stage.kind)
        if split is not None and split not in held:
            fix = "train=<DataLoader>, or retrain=none" if stage.kind == "retrain" else f"{split}=<DataLoader>"
            raise ConfigError(f"{type(method).__name__}: stage {stage.tag} ({stage.kind}) needs {split} data, and none was given (pass {fix})")
    if method.needs_training_data and "train" not in held:
        raise ConfigError(f"{type(method).__name__} scores with training batches, and no training data was given (pass train=<DataLoader>)")


def _final_validation(stages: list[Stage], summary: dict[str, Any], retrain_on_val: bool = False) -> dict[str, float]:
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


def _check_finite(summary: dict[str, Any]) -> None:
    """A summary is strict JSON: a NaN or infinite result stops the run instead of being reported."""
    bad = sorted(k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise NonFiniteError(f"the run ended with non-finite results ({', '.join(bad)}); nothing was written as complete")


def plan_stages(cfg: DictConfig, method: PruningMethod, pretrained: bool = False) -> list[Stage]:
    """The full, flat stage list: the method's own stages (rounds expanded), wrapped in the shared steps.

    A method that prunes gets dense pre-training (when `pretrain.epochs` > 0), an evaluation of the
    dense model (when trained or pretrained), BN re-estimation after each prune stage (when
    `bn_recalibration.batches` > 0), a test of the model right after pruning ("pruned", when
    `test_pruned`) and retraining by `retrain.mode`: where the method places a
    "retrain" stage itself (e.g. in every round of IMP), else once at the end. A retraining stage is
    named after its mode and follows the `retrain` schedule; `retrain=none` drops it. Every run ends
    with the test. `pretrained`: the model arrives trained without `backbone.pretrained` (given from Python).
    """
    own: list[Stage] = []
    for item in method.stages():
        own.extend(item.expand() if isinstance(item, Rounds) else [item])
    stages: list[Stage] = []
    mode = cfg.retrain.mode
    if any(s.kind == "prune" for s in own):
        if cfg.pretrain.epochs:
            stages.append(Stage("pretrain", "fit", **_schedule(cfg.pretrain)))
        # The dense model is worth testing only when it was trained or loaded, not at random initialisation.
        if cfg.get("test", True) and (cfg.pretrain.epochs or pretrained or cfg.backbone.get("pretrained")):
            stages.append(Stage("dense", "test"))
        for stage in own:
            if stage.kind == "retrain":
                if mode == "none":
                    continue
                stage = replace(stage, name=mode, **_schedule(cfg.retrain))
            stages.append(stage)
            if stage.kind == "prune" and cfg.bn_recalibration.batches:
                batches = cfg.bn_recalibration.batches
                stages.append(Stage(f"{stage.name}_bn", "recalibrate", options={"batches": batches}, round=stage.round))
            if stage.kind == "prune" and cfg.get("test", True) and cfg.get("test_pruned", False):
                stages.append(Stage("pruned", "test", round=stage.round))
        if mode != "none" and not any(s.kind == "retrain" for s in own):
            stages.append(Stage(mode, "retrain", **_schedule(cfg.retrain)))
    else:
        stages.extend(own)
    if cfg.get("test", True):
        stages.append(Stage("test", "test"))
    tags = [s.tag for s in stages]
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise ValueError(f"{type(method).__name__}: stage names repeat within a round ({', '.join(repeated)})")
    return stages


def stage_dirs(stages: list[Stage]) -> list[str]:
    """Directory names under `stages/`: `<i>-<name>` by position, `r<round>-<j>-<name>` within a round."""
    names = []
    within = 0
    for index, stage in enumerate(stages):
        if stage.round is None:
            names.append(f"{index}-{stage.name}")
            continue
        within = within + 1 if index and stages[index - 1].round == stage.round else 0
        names.append(f"r{stage.round}-{within}-{stage.name}")
    return names


def _schedule(node: DictConfig) -> dict[str, Any]:
    """A stage's schedule from its config node (None entries fall back to the experiment's)."""
    return {key: node.get(key) for key in ("epochs", "lr", "optimizer", "scheduler")}


def _run_stage(
    ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module, closes_round: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Run one stage, or load its saved output (model, method state, metrics) when it already completed."""
    done = stage_dir / "done.json"
    state_file = stage_dir / "method.pt"
    if done.exists():
        log.info("stage %s already done (%s): skipping", stage.tag, done)
        results = json.loads(done.read_text())
        saved = stage_dir / "model.pt"
        if state_file.exists():
            ctx.method.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
        return (load_model(saved, base=ctx.base) if saved.exists() else model), results

    log.info("stage %s (%s) starting", stage.tag, stage.kind)
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = ctx.method.setup(model, stage, ctx.for_method(model, stage))
    metrics, model = RUNNERS[stage.kind](ctx, stage, stage_dir, model)
    model = ctx.method.teardown(model, stage)
    # A resumed fit stage also counts the time its earlier invocations spent up to their last checkpoint.
    earlier = metrics.pop(_EARLIER, 0.0)
    results = {**metrics, f"time/{stage.tag}_s": round(time.perf_counter() - start + earlier, 3)}
    if closes_round:
        results.update(_round_metrics(ctx, stage.round, model))
    if rank_zero_only.rank == 0:
        if stage.kind != "test":
            save_model(model, stage_dir / "model.pt")
        state = ctx.method.state_dict()
        if state:
            save_torch(state_file, state)
        write_json(done, results, sort_keys=True)
    return model, results


def _round_metrics(ctx: Context, round_: int, model: nn.Module) -> dict[str, float]:
    """Where a round leaves the model: `round<r>/sparsity` (of its masks, else of its weights) and ratios."""
    now = measure(model, ctx.input_shape)
    masks = model_record(model).masks
    return {
        f"round{round_}/sparsity": masks.sparsity() if masks is not None else now["sparsity"],
        f"round{round_}/flops_ratio": now["flops"] / ctx.dense["flops"] if ctx.dense["flops"] else 1.0,
        f"round{round_}/params_ratio": now["params"] / ctx.dense["params"] if ctx.dense["params"] else 1.0,
    }


class _Checkpoint(ModelCheckpoint):
    """The stage's one checkpoint, `last.ckpt`: after every epoch and, optionally, every N optimizer steps.

    A step save is left out where a validation, the epoch's end or the stage's end follows the step:
    Lightning resumes such a checkpoint past the validation and the epoch-end hooks (the scheduler step,
    the epoch's metrics), so the resumed run would differ. The save after them takes its place.
    """

    def __init__(self, dirpath: Path, every_n_steps: int | None = None):
        # With no monitored metric, top-1 keeps only the newest checkpoint, always named last.ckpt.
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False, every_n_train_steps=every_n_steps)
        # Lightning takes step and epoch triggers as exclusive; the epoch save must stay on with steps.
        self._every_n_epochs = 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop
        if (
            loop.batch_progress.is_last_batch
            or trainer.should_stop
            or 0 <= trainer.max_steps <= trainer.global_step
            or _validates_after(trainer)
        ):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _validates_after(trainer: L.Trainer) -> bool:
    """Whether a validation follows this training batch (Lightning's own, private, decision)."""
    loop = trainer.fit_loop.epoch_loop
    check = getattr(loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    # Without the private API (another Lightning version): save the step; a mid-epoch validation's
    # metrics could then be missing after a resume, nothing else.
    return bool(check(fetcher)) if check is not None and fetcher is not None else False


def _fit(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    """Train with Lightning, resuming from the stage's last checkpoint when there is one.

    The stage ends after its epochs (-1: no epoch limit), its `max_steps`, or when the method's
    `should_stop` gives a reason; `<stage>/end` records which, `<stage>/steps` the optimizer steps.
    """
    cfg = ctx.cfg
    epochs = stage.epochs if stage.epochs is not None else cfg.trainer.max_epochs
    if epochs == 0 or stage.max_steps == 0:
        return {}, model
    if epochs < 0 and stage.max_steps is None:
        raise ValueError(f"stage {stage.tag}: a stage without an epoch limit needs max_steps as a safety net")
    optimizer = stage.optimizer if stage.optimizer is not None else cfg.optimizer
    # `interval: step` in a scheduler's node steps it after every optimizer step instead of every epoch.
    scheduler = stage.scheduler if stage.scheduler is not None else cfg.scheduler
    interval = "epoch"
    if scheduler is not None:
        scheduler = OmegaConf.create(OmegaConf.to_container(scheduler, resolve=True) if OmegaConf.is_config(scheduler) else dict(scheduler))
        interval = scheduler.pop("interval", "epoch")
    module = PruneLitModule(
        model=model,
        num_classes=ctx.num_classes,
        optimizer=instantiate(optimizer, **({"lr": stage.lr} if stage.lr is not None else {})),
        scheduler=instantiate(scheduler),
        method=ctx.method,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        stage=stage.tag,
        seed=int(cfg.seed),
        scheduler_interval=interval,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        compile=bool(cfg.trainer.get("compile", False)),
    )
    checkpoints = stage_dir / "checkpoints"
    # With no monitored metric, top-1 keeps only the newest checkpoint, always named last.ckpt.
    checkpoint = _Checkpoint(dirpath=checkpoints, every_n_steps=cfg.get("checkpoint_every_n_steps") or None)
    clock = _StageClock()
    callbacks: list[Callback] = [checkpoint, clock, *(ctx.rewind.callbacks() if ctx.rewind is not None else [])]
    # A stage may set its own Trainer arguments, e.g. several validations inside one long epoch.
    limits = {"max_steps": stage.max_steps} if stage.max_steps is not None else {}
    trainer = _trainer(ctx, max_epochs=epochs, callbacks=callbacks, **limits, **stage.options.get("trainer", {}))
    last = checkpoints / "last.ckpt"
    if last.exists() and not _readable(last):
        # Checkpoints are written atomically, so this is damage from outside (a disk, an older version).
        last.replace(last.with_name("last.ckpt.corrupt"))
        log.warning("stage %s: %s is unreadable (kept as last.ckpt.corrupt); the stage starts again", stage.tag, last)
    if last.exists():
        log.info("resuming stage %s from %s", stage.tag, last)
    # Unstructured masks stay applied through training (masked weights stay exactly zero), unless the
    # method attached masks of its own for the stage (it removes them itself in `teardown`).
    masks = model_record(model).masks
    attach = masks is not None and not structure.has_masks(model)
    if attach:
        structure.attach_masks(model, masks)
    synced = distributed.sync_batchnorm(model) if cfg.trainer.get("sync_batchnorm", False) else contextlib.nullcontext()
    with synced:
        trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=str(last) if last.exists() else None)
    if attach:
        structure.fold_masks(model)
    if trainer.interrupted:
        raise RunInterrupted(f"stage {stage.tag} was interrupted; run the same command again to resume it")
    if module.stop_reason:
        end = f"condition: {module.stop_reason}"
    elif stage.max_steps is not None and trainer.global_step >= stage.max_steps:
        end = "max_steps"
    else:
        end = "max_epochs"
    # A resume with no epoch left to run logs nothing: the checkpoint's metrics stand in.
    metrics: dict[str, Any] = _floats({**module.restored_metrics, **trainer.callback_metrics}, prefix=f"{stage.tag}/")
    metrics.update({f"{stage.tag}/steps": int(trainer.global_step), f"{stage.tag}/end": end, _EARLIER: clock.earlier})
    return metrics, model


def _prune(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Ask the method for a plan, apply it (channels removed, or weights masked), record it."""
    plan = ctx.method.plan(model, ctx.for_method(model, stage))
    # Every DDP rank computed the plan from the same weights and batches; they must agree.
    distributed.check_same(f"the plan of stage {stage.tag}", plan)
    if isinstance(plan, structure.ChannelPlan):
        structure.apply_channel_plan(model, plan, ctx.input_shape)
        plan.save_json(stage_dir / "plan.json")
    elif isinstance(plan, structure.MaskPlan):
        structure.zero_masked_(model, plan)
        model_record(model).masks = plan
        plan.save(stage_dir / "masks.pt")
        write_json(stage_dir / "plan.json", plan.to_dict())
    else:
        raise TypeError(f"{type(ctx.method).__name__}.plan() returned {type(plan).__name__}, not a plan")
    rows = dashboard.layer_rows(plan)
    if rows and rank_zero_only.rank == 0:
        what = "channels kept per group" if isinstance(plan, structure.ChannelPlan) else "weights kept per layer"
        png = dashboard.plot_layers(rows, f"{stage.tag}: {what}", stage_dir / "layers.png")
        dashboard.log_prune(ctx.logger, stage.tag, rows, png)
    after = measure(model, ctx.input_shape)
    metrics = {
        f"{stage.tag}/flops_ratio": after["flops"] / ctx.dense["flops"],
        f"{stage.tag}/params_ratio": after["params"] / ctx.dense["params"],
        f"{stage.tag}/sparsity": plan.sparsity() if isinstance(plan, structure.MaskPlan) else after["sparsity"],
    }
    return metrics, model


def _rewind(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Restore the weights of iteration `retrain.rewind_iteration` under the current structure and masks."""
    return {f"{stage.tag}/iteration": ctx.rewind.iteration}, ctx.rewind.restore(model)


def _recalibrate(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Re-estimate BatchNorm statistics on training batches without any weight update.

    torch's `update_bn` resets the running statistics and averages them over the batches it is given
    (momentum None, i.e. a cumulative average); `batches` < 0 uses the whole training set.
    """
    ctx.datamodule.setup("fit")
    loader = ctx.datamodule.train_dataloader(epoch=0)
    batches = stage.options["batches"]
    limited = loader if batches < 0 else itertools.islice(loader, batches)
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(limited, model, device=device)
    return {f"{stage.tag}/batches": len(loader) if batches < 0 else min(batches, len(loader))}, model


def _retrain(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    """Prepare the pruned model as `retrain.mode` says, then train it.

    finetune keeps the weights; scratch and scratch_b re-initialise the pruned architecture (scratch_b
    also scales the epochs to the dense model's compute, Liu et al. 2019); rewind restores the weights
    of iteration k under the current structure and masks (`Rewind`).
    """
    cfg = ctx.cfg.retrain
    mode = cfg.mode
    epochs = stage.epochs if stage.epochs is not None else ctx.cfg.trainer.max_epochs
    if mode in ("scratch", "scratch_b"):
        structure.reinitialize(model)
    elif mode == "rewind":
        model = ctx.rewind.restore(model)
    elif mode != "finetune":
        raise ValueError(f"retrain.mode must be finetune, scratch, scratch_b, rewind or none; got {mode!r}")
    if mode == "scratch_b":
        epochs = scratch_b_epochs(epochs, ctx.dense["flops"], count_flops(model, ctx.input_shape), cfg.max_factor)
    # `retrain.with_val` trains on the validation images too (Pruning from Scratch's official code does).
    with_val = bool(cfg.get("with_val", False))
    if with_val:
        ctx.datamodule.train_on_validation(True)
    try:
        metrics, model = _fit(ctx, replace(stage, kind="fit", epochs=epochs), stage_dir, model)
    finally:
        if with_val:
            ctx.datamodule.train_on_validation(False)
    return {**metrics, f"{stage.tag}/epochs": epochs}, model


def _test(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Evaluate on the test split."""
    module = PruneLitModule(model=model, num_classes=ctx.num_classes, method=ctx.method, stage=stage.tag,
                            channels_last=bool(ctx.cfg.trainer.get("channels_last", False)))
    trainer = _trainer(ctx, max_epochs=1, callbacks=[])
    results = trainer.test(module, datamodule=ctx.datamodule, verbose=False)
    if trainer.interrupted:
        raise RunInterrupted("testing was interrupted; run the same command again to resume it")
    return _floats(results[0] if results else {}, prefix=module.test_prefix + "test/"), model


# Every runner returns the stage's metrics and the model it leaves (a stage may replace the model).
RUNNERS = {
    "fit": _fit,
    "prune": _prune,
    "rewind": _rewind,
    "recalibrate": _recalibrate,
    "retrain": _retrain,
    "test": _test,
}


def _trainer(ctx: Context, max_epochs: int, callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer` for one stage (`overrides` replace its fields).

    The data loaders shard themselves across DDP ranks (`prunelab.distributed`), so Lightning's
    padding DistributedSampler is off; BatchNorm is synchronised by `_fit` (torch's SyncBatchNorm
    runs on GPUs only), so Lightning's `sync_batchnorm` is off too.
    """
    options = {k: v for k, v in ctx.cfg.trainer.items() if k not in ("channels_last", "compile")}
    return instantiate(
        OmegaConf.create(options),
        **overrides,
        sync_batchnorm=False,
        use_distributed_sampler=False,
        max_epochs=max_epochs,
        logger=ctx.logger if ctx.logger is not None else False,
        callbacks=callbacks + ctx.callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name and renamed: a kill never leaves a torn one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))


def _readable(path: Path) -> bool:
    """Whether a checkpoint file is a complete archive (torch.save writes zip archives)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _latency(
    cfg: DictConfig, model: nn.Module, dense_spec: dict | None, input_shape: tuple[int, ...], fmt: str, base: nn.Module | None = None
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
    kwargs = {"batch_sizes": tuple(lat.batch_sizes), "device": lat.device, "warmup": lat.warmup, "repeats": lat.repeats,
              "rounds": rounds, "seconds": 0.05 * rounds, "max_seconds": lat.get("max_seconds")}
    # An architecture no plan changed is the dense one: timing it twice would only measure noise.
    changed = model_record(model).plans or model_record(model).spec != dense_spec
    dense_model = _dense_model(dense_spec, base) if changed else None
    out: dict[str, Any] = {"latency/format": fmt, "latency/threads": torch.get_num_threads(), "latency/device": str(latency_device(lat.device)),
                           "latency/rounds": kwargs["rounds"]}
    # On a CPU a large model at batch 64 takes seconds a call (a 167M-parameter ViT at 224 px), minutes in all.
    log.info(
        "timing the %s model, eager and as %s, at batch sizes %s in %d interleaved rounds (latency.batch_sizes=[] skips this)",
        "final and the dense" if changed else "final", fmt, list(lat.batch_sizes), kwargs["rounds"],
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
                log.info("%s batch %d: %s, round-to-round spread %.1f%%", label, b, beside.describe(), 100 * beside.spread)
    return out


def _dense_model(spec: dict | None, base: nn.Module | None) -> nn.Module:
    """A dense model of the run's architecture to time beside the final one: built from the backbone's
    spec, or a copy of the model given from Python."""
    return rebuild(spec) if spec is not None else copy.deepcopy(base)


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The epoch-level metrics under `prefix` (Lightning's per-step `_step`/`_epoch` copies dropped)."""
    return {
        k: round(float(v), 6)
        for k, v in metrics.items()
        if k.startswith(prefix) and not k.endswith(("_step", "_epoch"))
    }


class _DropTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


# Warnings of our dependencies that say nothing about the user's run.
_KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


# Other libraries' loggers whose INFO lines say nothing about the run: Lightning's accelerator lines
# ("GPU available: False, used: False", "Loading `train_dataloader` to estimate ...") repeat for every
# stage, the ONNX exporter's passes ("Replaced initializer ...", "The value 'step' is not 1.") for every
# export; an ONNX run printed 99 of them in 132 lines. `verbose_libraries` or `hydra.verbose` shows them.
_LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "onnx", "onnxscript", "onnx_ir")


def _quiet_logs(quiet: bool, libraries: bool = False, verbose: bool | tuple[str, ...] = ()) -> None:
    """Every log line once, without Lightning's tips, known deprecation noise or other libraries' INFO lines.

    `quiet` keeps warnings only, prunelab's included; `libraries` lets other libraries log what prunelab
    does (INFO unless `quiet`). A logger that Hydra's `hydra.verbose` names (`verbose`, True: all of them)
    keeps the level Hydra gave it, and so do the loggers under it.

    Lightning gives its "lightning" logger a console handler of its own and also passes records on to
    the root logger, which Hydra gives a console and a file handler: with both, every line shows twice.
    """
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
            lightning_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for message in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    level = logging.WARNING if quiet else logging.INFO
    # Lightning sets INFO on its sub-packages' loggers itself, so each is set here.
    levels = {"prunelab": level, **{name: level if libraries else logging.WARNING for name in _LIBRARY_LOGGERS}}
    for name, value in levels.items():
        named = verbose is True or any(name == v or name.startswith(v + ".") for v in verbose or ())
        if not named:
            logging.getLogger(name).setLevel(value)


def _hydra_verbose() -> bool | tuple[str, ...]:
    """The loggers `hydra.verbose` sets to DEBUG: True for all of them, else their names (none outside Hydra)."""
    if not HydraConfig.initialized():
        return ()
    verbose = HydraConfig.get().verbose
    if isinstance(verbose, bool):
        return verbose
    return (verbose,) if isinstance(verbose, str) else tuple(verbose)


def _use_wandb_offline_without_key() -> None:
    """W&B logs offline when no API key is configured, instead of prompting or failing."""
    netrc = Path.home() / ".netrc"
    has_key = "WANDB_API_KEY" in os.environ or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """A before/after table of the dense and the final model, and where the full summary is."""
    from rich.console import Console
    from rich.table import Table

    rows = [("accuracy (%)", "dense/test/acc", "test/acc"), ("FLOPs (MACs)", "dense/flops", "model/flops")]
    rows.append(("parameters", "dense/params", "model/params"))
    batches = sorted({int(k[len("model/latency_b"):].split("_")[0]) for k in summary if k.startswith("model/latency_b")})
    for b in batches:
        rows.append((f"latency batch {b} (ms, eager)", f"dense/latency_b{b}_ms", f"model/latency_b{b}_ms"))
        rows.append((f"latency batch {b} (ms, deployed)", f"dense/deployed_latency_b{b}_ms", f"model/deployed_latency_b{b}_ms"))
    table = Table(title="prunelab summary")
    for column in ("", "dense", "final", "final / dense"):
        table.add_column(column, justify="right" if column else "left", no_wrap=not column)
    for label, dense_key, final_key in rows:
        dense, final = summary.get(dense_key), summary.get(final_key)
        cells = [_fmt(dense), _fmt(final), f"{final / dense:.3f}" if dense and final is not None else ""]
        if "latency" in final_key and summary.get(f"{final_key}_min") is not None:
            # A latency is the median over interleaved rounds, with its fastest and slowest round; the ratio the
            # inverse of the median speedup, with the rounds' range.
            speedup = final_key.replace("latency", "speedup").removesuffix("_ms")
            cells = [
                _with_range(dense, summary.get(f"{dense_key}_min"), summary.get(f"{dense_key}_max"), _fmt),
                _with_range(final, summary.get(f"{final_key}_min"), summary.get(f"{final_key}_max"), _fmt),
                _with_range(1 / summary[speedup], 1 / summary[f"{speedup}_max"], 1 / summary[f"{speedup}_min"], "{:.3f}".format),
            ]
        table.add_row(label, *cells)
    if summary.get("model/latency_ratio") is not None:
        table.add_row("latency budget (final / dense)", "", "", _with_range(
            summary["model/latency_ratio"], summary.get("model/latency_ratio_min"), summary.get("model/latency_ratio_max"), "{:.3f}".format
        ))
    table.add_row("weight sparsity", "", _fmt(summary.get("model/sparsity")), "")
    console = Console()
    console.print(table)
    if batches and summary.get("model/flops"):
        speedups = ", ".join(
            f"{_speedup(summary, f'model/deployed_speedup_b{b}')} at batch {b} (eager {_speedup(summary, f'model/speedup_b{b}')})"
            for b in batches
            if summary.get(f"model/deployed_speedup_b{b}") and summary.get(f"model/speedup_b{b}")
        )
        how = f", median of {summary['latency/rounds']} interleaved rounds (lowest-highest round)" if summary.get("latency/rounds", 1) > 1 else ""
        console.print(
            f"deployed ({summary.get('latency/format')}, {summary.get('latency/device')}, {summary.get('latency/threads')} threads{how}): "
            f"{speedups} for {summary['dense/flops'] / summary['model/flops']:.2f}x fewer FLOPs"
        )
    rounds = round_rows(summary)
    if rounds:
        per_round = Table(title="rounds")
        for column in ("round", "sparsity", "FLOPs ratio", "test accuracy (%)"):
            per_round.add_column(column, justify="right")
        for row in rounds:
            per_round.add_row(str(row["round"]), _fmt(row["sparsity"]), _fmt(row["flops_ratio"]), _fmt(row["test/acc"]))
        console.print(per_round)
    console.print(f"run directory: {run_dir}  (all metrics in summary.json)")


def _with_range(value: float, low: float | None, high: float | None, form) -> str:
    """A median (formatted by `form`) over the range of its rounds, "1.230\n(1.10-1.31)", or the median alone without a
    range. The range has three significant digits or two decimals, to fit an 80-column table."""
    if low is None or high is None or low == high:
        return form(value)
    short = lambda v: f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"  # noqa: E731
    return f"{form(value)}\n({short(low)}-{short(high)})"


def _speedup(summary: dict[str, Any], key: str) -> str:
    """A speedup with the range of its rounds; one whose range holds 1.0 is no measured speedup or slowdown."""
    median, low, high = summary[key], summary.get(f"{key}_min"), summary.get(f"{key}_max")
    if low is None or high is None or low == high:
        return f"{median:.2f}x"
    return f"{median:.2f}x ({low:.2f}-{high:.2f}{', within noise' if low <= 1.0 <= high else ''})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return f"{value:,}"
