"""`run`: one experiment from its config, from the checks and the objects it builds to the summary it writes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab import dashboard, structure
from prunelab.budget import budget_latency, deployed_latency, measure
from prunelab.data import ImageDataModule, adopt
from prunelab.export import FORMATS, export_deployable, save_model
from prunelab.io import RunLock, write_json, write_text
from prunelab.pipeline.build import build, build_backbone, build_dataset
from prunelab.pipeline.context import Context, Rewind
from prunelab.pipeline.finish import check_finite, final_figures, final_validation, latency_figures
from prunelab.pipeline.logs import hydra_verbose, quiet_logs, use_wandb_offline_without_key
from prunelab.pipeline.record import claim_run_dir
from prunelab.pipeline.runners import run_stage
from prunelab.pipeline.stages import check_data, check_rewind_reachable, plan_stages, stage_dirs
from prunelab.pipeline.table import print_summary
from prunelab.structure import model_record
from prunelab.validate import ConfigError, check_config, check_layer_ratios, check_skip


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


def _run(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: list[Callback] | None,
    model: nn.Module | None = None,
    datamodule: L.LightningDataModule | None = None,
) -> dict[str, Any]:
    quiet_logs(bool(cfg.get("quiet", False)), bool(cfg.get("verbose_libraries", False)), hydra_verbose())
    use_wandb_offline_without_key()
    # Every rank checks (ranks > 0 only read): a refused command stops before it writes or loads anything.
    claim_run_dir(run_dir, cfg)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # The one place where the experiment's objects are built from the config (unless given from Python).
    if datamodule is None:
        datamodule = build_dataset(cfg.dataset)
    try:
        # A LightningDataModule of the user's own class (`dataset._target_`) is used through its loaders.
        datamodule = adopt(datamodule, str(cfg.dataset.get("_target_", "")))
        datamodule.prepare_data()
        if isinstance(datamodule, ImageDataModule):
            # Splits are drawn now, so sizes that do not fit the data (val_size, subset) stop the run before any stage.
            datamodule.setup("fit")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    # A model given from Python, as it came: models of its class are rebuilt on a copy of it (`load_model`).
    base = copy.deepcopy(model) if model is not None else None
    if model is None:
        model = build_backbone(cfg, datamodule.num_classes, tuple(datamodule.input_shape))
    if cfg.budget.get("layer_ratios"):
        check_layer_ratios(list(cfg.budget.layer_ratios), model)
    method = build(cfg.method)
    stages = plan_stages(cfg, method, pretrained=base is not None)
    check_data(stages, method, datamodule)
    prunes = any(s.kind == "prune" for s in stages)
    if method.budget_keys and prunes and all(cfg.budget.get(k) is None for k in method.budget_keys):
        wanted = " or ".join(f"budget.{k}" for k in method.budget_keys)
        raise ConfigError(f"{type(method).__name__} prunes to a budget: set {wanted}")
    input_shape = tuple(datamodule.input_shape)
    model_record(model).skip = check_skip(list(cfg.get("structure", {}).get("skip") or []), model)
    model_record(model).prune_embedding = bool(cfg.get("structure", {}).get("prune_embedding", False))
    model_record(model).prune_head_dim = bool(cfg.get("structure", {}).get("prune_head_dim", False))
    if (
        prunes
        and "flops" in method.budget_keys
        and any(cfg.budget.get(k) is not None for k in ("flops", "params", "latency", "layer_ratios"))
    ):
        # The groups (and that they passed the check) are kept in the run directory: a resumed run skips both.
        if not structure.remember_groups(model, input_shape, run_dir / "groups.json"):
            structure.check_prunable(model, input_shape)
            structure.remember_groups(model, input_shape, run_dir / "groups.json", checked=True)
    logger = build(cfg.logger, **dashboard.logger_options(cfg)) if cfg.get("logger") else None
    if logger is not None:
        logger.log_hyperparams(dashboard.flat_config(cfg))
    dirs = stage_dirs(stages)
    write_json(
        run_dir / "stages.json",
        [{"dir": d, "name": s.name, "kind": s.kind, "round": s.round} for s, d in zip(stages, dirs)],
    )
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
        check_rewind_reachable(ctx, stages)
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
        model, results = run_stage(ctx, stage, run_dir / "stages" / directory, model, closes_round)
        summary.update(results)

    summary.update(final_figures(cfg, model, ctx.dense, dense_spec, base, ctx.input_shape))
    fmt = cfg.export.format
    summary.update(latency_figures(cfg, model, dense_spec, ctx.input_shape, fmt, base))
    summary.update(final_validation(stages, summary, retrain_on_val=bool(cfg.retrain.get("with_val", False))))
    check_finite(summary)
    if rank_zero_only.rank == 0:
        save_model(model, run_dir / "model.pt")
        export_deployable(model, run_dir / FORMATS[fmt], ctx.input_shape, fmt)
        write_json(run_dir / "summary.json", summary, sort_keys=True)
        dashboard.finish(logger, cfg, run_dir, summary)
        print_summary(summary, run_dir)
    return summary
