"""One stage run, or its saved output loaded when it already completed; a runner for each kind of stage."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torch import nn

from prunelab import dashboard, distributed, structure
from prunelab.budget import count_flops, measure, scratch_b_epochs
from prunelab.export import load_model, save_model
from prunelab.io import save_torch, write_json
from prunelab.lit import PruneLitModule
from prunelab.methods.base import Stage
from prunelab.pipeline.context import Context
from prunelab.pipeline.trainer import StageCheckpoint, StageClock, checkpoint_readable, stage_trainer
from prunelab.structure import model_record

log = logging.getLogger("prunelab")


class RunInterrupted(RuntimeError):
    """A stage stopped before it completed (e.g. Ctrl-C); its output is not marked as done."""


# The key under which a fit runner hands the time of earlier invocations of its stage to `run_stage`.
_EARLIER = "_earlier_s"


def run_stage(
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
        scheduler = OmegaConf.create(
            OmegaConf.to_container(scheduler, resolve=True) if OmegaConf.is_config(scheduler) else dict(scheduler)
        )
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
    checkpoint = StageCheckpoint(dirpath=checkpoints, every_n_steps=cfg.get("checkpoint_every_n_steps") or None)
    clock = StageClock()
    callbacks: list[Callback] = [checkpoint, clock, *(ctx.rewind.callbacks() if ctx.rewind is not None else [])]
    # A stage may set its own Trainer arguments, e.g. several validations inside one long epoch.
    limits = {"max_steps": stage.max_steps} if stage.max_steps is not None else {}
    trainer = stage_trainer(ctx, max_epochs=epochs, callbacks=callbacks, **limits, **stage.options.get("trainer", {}))
    last = checkpoints / "last.ckpt"
    if last.exists() and not checkpoint_readable(last):
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


def prune_stage(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
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
    module = PruneLitModule(
        model=model,
        num_classes=ctx.num_classes,
        method=ctx.method,
        stage=stage.tag,
        channels_last=bool(ctx.cfg.trainer.get("channels_last", False)),
    )
    trainer = stage_trainer(ctx, max_epochs=1, callbacks=[])
    results = trainer.test(module, datamodule=ctx.datamodule, verbose=False)
    if trainer.interrupted:
        raise RunInterrupted("testing was interrupted; run the same command again to resume it")
    return _floats(results[0] if results else {}, prefix=module.test_prefix + "test/"), model


# Every runner returns the stage's metrics and the model it leaves (a stage may replace the model).
RUNNERS = {
    "fit": _fit,
    "prune": prune_stage,
    "rewind": _rewind,
    "recalibrate": _recalibrate,
    "retrain": _retrain,
    "test": _test,
}


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The epoch-level metrics under `prefix` (Lightning's per-step `_step`/`_epoch` copies dropped)."""
    return {
        k: round(float(v), 6)
        for k, v in metrics.items()
        if k.startswith(prefix) and not k.endswith(("_step", "_epoch"))
    }
