"""Runs a method's stages in order; a stage whose output exists is skipped, so a killed run resumes."""

from __future__ import annotations

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
from torch import nn

from prunelab.budget import measure
from prunelab.export import load_model, save_model
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
    logger: Any = None
    callbacks: list[Callback] = field(default_factory=list)

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

    dense = measure(model, ctx.input_shape)
    summary: dict[str, Any] = {"dense/flops": dense["flops"], "dense/params": dense["params"]}
    stages = method.stages() + ([Stage("test", "test")] if cfg.get("test", True) else [])
    for index, stage in enumerate(stages):
        model, results = _run_stage(ctx, index, stage, model)
        summary.update(results)

    final = measure(model, ctx.input_shape)
    summary.update(
        {
            "model/flops": final["flops"],
            "model/params": final["params"],
            "model/flops_ratio": final["flops"] / dense["flops"] if dense["flops"] else 1.0,
            "model/params_ratio": final["params"] / dense["params"] if dense["params"] else 1.0,
            "model/sparsity": final["sparsity"],
        }
    )
    if rank_zero_only.rank == 0:
        save_model(model, run_dir / "model.pt")
        _write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if logger is not None:
            logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            logger.finalize("success")
        _print_summary(summary, run_dir)
    return summary


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
    metrics = RUNNERS[stage.kind](ctx, stage, stage_dir, model)
    model = ctx.method.teardown(model, stage)
    results = {**metrics, f"time/{stage.name}_s": round(time.perf_counter() - start, 3)}
    if rank_zero_only.rank == 0:
        if stage.kind != "test":
            save_model(model, stage_dir / "model.pt")
        _write_text(done, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return model, results


def _fit(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> dict[str, float]:
    """Train with Lightning, resuming from the stage's last checkpoint when there is one."""
    cfg = ctx.cfg
    epochs = stage.epochs if stage.epochs is not None else cfg.trainer.max_epochs
    if epochs <= 0:
        return {}
    module = PruneLitModule(
        model=model,
        num_classes=ctx.num_classes,
        optimizer=instantiate(stage.optimizer if stage.optimizer is not None else cfg.optimizer),
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
    trainer = _trainer(ctx, max_epochs=epochs, callbacks=[checkpoint])
    last = checkpoints / "last.ckpt"
    if last.exists():
        log.info("resuming stage %s from %s", stage.name, last)
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=str(last) if last.exists() else None)
    if trainer.interrupted:
        raise RunInterrupted(f"stage {stage.name} was interrupted; run the same command again to resume it")
    return _floats(trainer.callback_metrics, prefix=f"{stage.name}/")


def _test(ctx: Context, stage: Stage, stage_dir: Path, model: nn.Module) -> dict[str, float]:
    """Evaluate on the test split."""
    module = PruneLitModule(model=model, num_classes=ctx.num_classes, method=ctx.method, stage=stage.name)
    trainer = _trainer(ctx, max_epochs=1, callbacks=[])
    results = trainer.test(module, datamodule=ctx.datamodule, verbose=False)
    if trainer.interrupted:
        raise RunInterrupted("testing was interrupted; run the same command again to resume it")
    return _floats(results[0] if results else {}, prefix="test/")


RUNNERS = {"fit": _fit, "test": _test}


def _trainer(ctx: Context, max_epochs: int, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer from `cfg.trainer` for one stage."""
    return instantiate(
        ctx.cfg.trainer,
        max_epochs=max_epochs,
        logger=ctx.logger if ctx.logger is not None else False,
        callbacks=callbacks + ctx.callbacks,
        default_root_dir=str(ctx.run_dir),
        enable_model_summary=False,
    )


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
    from rich.console import Console
    from rich.table import Table

    table = Table(title="prunelab summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(summary):
        value = summary[key]
        table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}")
    console = Console()
    console.print(table)
    console.print(f"run directory: {run_dir}")
