"""Runs a method's stages in order; a stage whose output exists is skipped, so a killed run resumes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
import torch
from torch import nn

from prunelab import structure
from prunelab.budget import count_flops, measure, measure_latency, scratch_b_epochs
from prunelab.export import export_deployable, load_model, save_model
from prunelab.lit import PruneLitModule
from prunelab.methods.base import PruningMethod, Stage

log = logging.getLogger("prunelab")


class RunInterrupted(RuntimeError):
    """A stage stopped before it completed (e.g. Ctrl-C); its output is not marked as done."""


@dataclass
class Context:
    """What the stages of one experiment share."""

    cfg: DictConfig
    run_dir: Path
    datamodule: L.LightningDataModule
    method: PruningMethod
    input_shape: tuple[int, int, int]
    dense: dict[str, float] = field(default_factory=dict)
    logger: Any = None
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def budget(self) -> DictConfig:
        return self.cfg.budget

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes


def run(cfg: DictConfig, run_dir: str | Path, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run (or resume) the experiment described by `cfg` in `run_dir`; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _use_wandb_offline_without_key()
    _write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # The one place where the experiment's objects are built from the config.
    datamodule = instantiate(cfg.dataset)
    model = instantiate(cfg.backbone, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)
    method = instantiate(cfg.method)
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    ctx = Context(
        cfg=cfg,
        run_dir=run_dir,
        datamodule=datamodule,
        method=method,
        input_shape=(datamodule.in_channels, datamodule.image_size, datamodule.image_size),
        logger=logger,
        callbacks=list(callbacks or []),
    )
    method.bind(ctx)
    model.prunelab_input_shape = ctx.input_shape
    ctx.dense = measure(model, ctx.input_shape)
    dense_spec = dict(model.prunelab_spec)
    model = method.initial_model(model)
    model.prunelab_input_shape = ctx.input_shape
    rewind = run_dir / "rewind.pt"
    if cfg.retrain.mode == "rewind" and cfg.retrain.rewind_iteration == 0 and not rewind.exists():
        save_model(model, rewind)

    summary: dict[str, Any] = {"dense/flops": ctx.dense["flops"], "dense/params": ctx.dense["params"]}
    for index, stage in enumerate(plan_stages(cfg, method)):
        model, results = _run_stage(ctx, index, stage, model)
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
    summary.update(_latency(cfg, model, dense_spec, ctx.input_shape))
    if rank_zero_only.rank == 0:
        save_model(model, run_dir / "model.pt")
        export_deployable(model, run_dir / "model.ts", ctx.input_shape)
        _write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if logger is not None:
            logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            logger.finalize("success")
        _print_summary(summary, run_dir)
    return summary


def plan_stages(cfg: DictConfig, method: PruningMethod) -> list[Stage]:
    """The full stage list: the method's own stages, wrapped in the steps every pruning run shares.

    A method that prunes gets dense pre-training (when `pretrain.epochs` > 0), an evaluation of the
    dense model (when trained or pretrained), BN re-estimation after each prune stage (when
    `bn_recalibration.batches` > 0) and the retraining stage of `retrain.mode`; every run ends with
    the test.
    """
    own = method.stages()
    stages: list[Stage] = []
    if any(s.kind == "prune" for s in own):
        if cfg.pretrain.epochs:
            stages.append(Stage("pretrain", "fit", **_schedule(cfg.pretrain)))
        # The dense model is worth testing only when it was trained or loaded, not at random initialisation.
        if cfg.get("test", True) and (cfg.pretrain.epochs or cfg.backbone.get("pretrained")):
            stages.append(Stage("dense", "test"))
        for stage in own:
            stages.append(stage)
            if stage.kind == "prune" and cfg.bn_recalibration.batches:
                batches = cfg.bn_recalibration.batches
                stages.append(Stage(f"{stage.name}_bn", "recalibrate", options={"batches": batches}))
        if cfg.retrain.mode != "none":
            stages.append(Stage(cfg.retrain.mode, "retrain", **_schedule(cfg.retrain)))
    else:
        stages.extend(own)
    if cfg.get("test", True):
        stages.append(Stage("test", "test"))
    return stages


def _schedule(node: DictConfig) -> dict[str, Any]:
    """A stage's schedule from its config node (None entries fall back to the experiment's)."""
    return {key: node.get(key) for key in ("epochs", "lr", "optimizer", "scheduler")}


def _run_stage(ctx: Context, index: int, stage: Stage, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Run one stage, or load its saved output when it already completed."""
    stage_dir = ctx.run_dir / "stages" / f"{index}-{stage.name}"
    done = stage_dir / "done.json"
    if done.exists():
        log.info("stage %s already done (%s): skipping", stage.name, done)
        results = json.loads(done.read_text())
        saved = stage_dir / "model.pt"
        return (load_model(saved) if saved.exists() else model), results

    log.info("stage %s (%s) starting", stage.name, stage.kind)
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = ctx.method.setup(model, stage)
    metrics, model = RUNNERS[stage.kind](ctx, stage, stage_dir, model)
    model = ctx.method.teardown(model, stage)
    results = {**metrics, f"time/{stage.name}_s": round(time.perf_counter() - start, 3)}
    if rank_zero_only.rank == 0:
        if stage.kind != "test":
            save_model(model, stage_dir / "model.pt")
        _write_text(done, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return model, results


def _fit(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Train with Lightning, resuming from the stage's last checkpoint when there is one."""
    cfg = ctx.cfg
    epochs = stage.epochs if stage.epochs is not None else cfg.trainer.max_epochs
    if epochs <= 0:
        return {}, model
    optimizer = stage.optimizer if stage.optimizer is not None else cfg.optimizer
    module = PruneLitModule(
        model=model,
        num_classes=ctx.num_classes,
        optimizer=instantiate(optimizer, **({"lr": stage.lr} if stage.lr is not None else {})),
        scheduler=instantiate(stage.scheduler if stage.scheduler is not None else cfg.scheduler),
        method=ctx.method,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        stage=stage.name,
    )
    checkpoints = stage_dir / "checkpoints"
    # With no monitored metric, top-1 keeps only the newest checkpoint, always named last.ckpt.
    checkpoint = ModelCheckpoint(
        dirpath=checkpoints,
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        every_n_train_steps=cfg.get("checkpoint_every_n_steps") or None,
    )
    callbacks: list[Callback] = [checkpoint]
    rewind = ctx.run_dir / "rewind.pt"
    if cfg.retrain.mode == "rewind" and cfg.retrain.rewind_iteration > 0 and not rewind.exists():
        callbacks.append(_RewindSnapshot(rewind, cfg.retrain.rewind_iteration))
    # A stage may set its own Trainer arguments, e.g. several validations inside one long epoch.
    trainer = _trainer(ctx, max_epochs=epochs, callbacks=callbacks, **stage.options.get("trainer", {}))
    last = checkpoints / "last.ckpt"
    if last.exists():
        log.info("resuming stage %s from %s", stage.name, last)
    # Unstructured masks stay applied through training (masked weights stay exactly zero).
    masks = getattr(model, "prunelab_masks", None)
    if masks is not None and not structure.has_masks(model):
        structure.attach_masks(model, masks)
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=str(last) if last.exists() else None)
    if masks is not None:
        structure.fold_masks(model)
    if trainer.interrupted:
        raise RunInterrupted(f"stage {stage.name} was interrupted; run the same command again to resume it")
    return _floats(trainer.callback_metrics, prefix=f"{stage.name}/"), model


class _RewindSnapshot(Callback):
    """Saves the weights at training iteration k, for rewinding (Frankle et al.'s late rewinding)."""

    def __init__(self, path: Path, iteration: int):
        self.path = path
        self.iteration = iteration

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.iteration and not self.path.exists() and trainer.is_global_zero:
            save_model(pl_module.model, self.path)


def _prune(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Ask the method for a plan, apply it (channels removed, or weights masked), record it."""
    plan = ctx.method.plan(model, ctx)
    if isinstance(plan, structure.ChannelPlan):
        structure.apply_channel_plan(model, plan, ctx.input_shape)
        plan.save_json(stage_dir / "plan.json")
    elif isinstance(plan, structure.MaskPlan):
        structure.zero_masked_(model, plan)
        model.prunelab_masks = plan
        plan.save(stage_dir / "masks.pt")
        _write_text(stage_dir / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
    else:
        raise TypeError(f"{type(ctx.method).__name__}.plan() returned {type(plan).__name__}, not a plan")
    after = measure(model, ctx.input_shape)
    metrics = {
        f"{stage.name}/flops_ratio": after["flops"] / ctx.dense["flops"],
        f"{stage.name}/params_ratio": after["params"] / ctx.dense["params"],
        f"{stage.name}/sparsity": after["sparsity"],
    }
    return metrics, model


def _recalibrate(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Re-estimate BatchNorm statistics on training batches without any weight update.

    torch's `update_bn` resets the running statistics and averages them over the batches it is given
    (momentum None, i.e. a cumulative average); `batches` < 0 uses the whole training set.
    """
    ctx.datamodule.setup("fit")
    loader = ctx.datamodule.train_dataloader()
    batches = stage.options["batches"]
    limited = loader if batches < 0 else itertools.islice(loader, batches)
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(limited, model, device=device)
    return {f"{stage.name}/batches": len(loader) if batches < 0 else min(batches, len(loader))}, model


def _retrain(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Prepare the pruned model as `retrain.mode` says, then train it.

    finetune keeps the weights; scratch and scratch_b re-initialise the pruned architecture (scratch_b
    also scales the epochs to the dense model's compute, Liu et al. 2019); rewind restores the weights
    saved at initialisation or at iteration k and re-applies the structure and masks.
    """
    cfg = ctx.cfg.retrain
    mode = cfg.mode
    epochs = stage.epochs if stage.epochs is not None else ctx.cfg.trainer.max_epochs
    if mode in ("scratch", "scratch_b"):
        structure.reinitialize(model)
    elif mode == "rewind":
        model = _rewound(ctx, model)
    elif mode != "finetune":
        raise ValueError(f"retrain.mode must be finetune, scratch, scratch_b, rewind or none; got {mode!r}")
    if mode == "scratch_b":
        epochs = scratch_b_epochs(epochs, ctx.dense["flops"], count_flops(model, ctx.input_shape), cfg.max_factor)
    fit = Stage(stage.name, "fit", epochs=epochs, lr=stage.lr, optimizer=stage.optimizer, scheduler=stage.scheduler)
    metrics, model = _fit(ctx, fit, stage_dir, model)
    return {**metrics, f"{stage.name}/epochs": epochs}, model


def _rewound(ctx: Context, model: nn.Module) -> nn.Module:
    """The saved early weights with the pruned model's structure and masks applied."""
    path = ctx.run_dir / "rewind.pt"
    if not path.exists():
        raise RuntimeError(
            f"retrain.mode=rewind needs the weights of iteration {ctx.cfg.retrain.rewind_iteration}, but "
            f"{path} was never written (did training reach that iteration before pruning?)"
        )
    rewound = load_model(path)
    for plan in getattr(model, "prunelab_plans", []):
        structure.apply_channel_plan(rewound, plan, ctx.input_shape)
    masks = getattr(model, "prunelab_masks", None)
    if masks is not None:
        structure.zero_masked_(rewound, masks)
        rewound.prunelab_masks = masks
    rewound.prunelab_input_shape = ctx.input_shape
    return rewound


def _test(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> tuple[dict[str, float], nn.Module]:
    """Evaluate on the test split."""
    module = PruneLitModule(model=model, num_classes=ctx.num_classes, method=ctx.method, stage=stage.name)
    trainer = _trainer(ctx, max_epochs=1, callbacks=[])
    results = trainer.test(module, datamodule=ctx.datamodule, verbose=False)
    if trainer.interrupted:
        raise RunInterrupted("testing was interrupted; run the same command again to resume it")
    prefix = "test/" if stage.name == "test" else f"{stage.name}/test/"
    return _floats(results[0] if results else {}, prefix=prefix), model


# Every runner returns the stage's metrics and the model it leaves (a stage may replace the model).
RUNNERS = {"fit": _fit, "prune": _prune, "recalibrate": _recalibrate, "retrain": _retrain, "test": _test}


def _trainer(ctx: Context, max_epochs: int, callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer` for one stage (`overrides` replace its fields)."""
    return instantiate(
        ctx.cfg.trainer,
        **overrides,
        max_epochs=max_epochs,
        logger=ctx.logger if ctx.logger is not None else False,
        callbacks=callbacks + ctx.callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_model_summary=False,
    )


def _latency(cfg: DictConfig, model: nn.Module, dense_spec: dict, input_shape: tuple[int, int, int]) -> dict[str, float]:
    """Latency of the final model beside that of the dense architecture, measured in the same run."""
    lat = cfg.get("latency")
    if not lat or not lat.batch_sizes:
        return {}
    from prunelab.backbones import create

    kwargs = {"batch_sizes": tuple(lat.batch_sizes), "device": lat.device, "warmup": lat.warmup, "repeats": lat.repeats}
    final = measure_latency(model, input_shape, **kwargs)
    # An architecture no plan changed is the dense one: timing it twice would only measure noise.
    changed = getattr(model, "prunelab_plans", None) or model.prunelab_spec != dense_spec
    dense = measure_latency(create(**dense_spec), input_shape, **kwargs) if changed else final
    out = {}
    for key, value in final.items():
        out[f"dense/{key}"] = dense[key]
        out[f"model/{key}"] = value
        out[f"model/speedup_{key.split('_')[1]}"] = round(dense[key] / value, 4) if value else float("nan")
    return out


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The epoch-level metrics under `prefix` (Lightning's per-step `_step`/`_epoch` copies dropped)."""
    return {
        k: round(float(v), 6)
        for k, v in metrics.items()
        if k.startswith(prefix) and not k.endswith(("_step", "_epoch"))
    }


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically: it either holds all of `text` or does not exist."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    rows += [
        (f"latency batch {k.split('_b')[1].split('_')[0]} (ms)", f"dense/{k.split('/')[1]}", k)
        for k in sorted((k for k in summary if k.startswith("model/latency_b")), key=lambda k: int(k[15:].split("_")[0]))
    ]
    table = Table(title="prunelab summary")
    for column in ("", "dense", "final", "final / dense"):
        table.add_column(column, justify="right" if column else "left")
    for label, dense_key, final_key in rows:
        dense, final = summary.get(dense_key), summary.get(final_key)
        ratio = f"{final / dense:.3f}" if dense and final is not None else ""
        table.add_row(label, _fmt(dense), _fmt(final), ratio)
    table.add_row("weight sparsity", "", _fmt(summary.get("model/sparsity")), "")
    console = Console()
    console.print(table)
    console.print(f"run directory: {run_dir}  (all metrics in summary.json)")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return f"{value:,}"
