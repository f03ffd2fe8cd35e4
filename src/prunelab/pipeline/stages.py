"""The stage list of a run: the method's stages (rounds expanded) wrapped in the shared steps, their
directories, and the checks that refuse, before any work, a stage the data or the schedule cannot serve."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import lightning as L
from omegaconf import DictConfig

from prunelab.methods.base import PruningMethod, Rounds, Stage
from prunelab.pipeline.context import Context
from prunelab.validate import ConfigError


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
    # A plain string: it names the retraining stage, which checkpoints record (torch.load with weights_only=True).
    mode = str(cfg.retrain.mode)
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


def check_rewind_reachable(ctx: Context, stages: list[Stage]) -> None:
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


def check_data(stages: list[Stage], method: PruningMethod, datamodule: L.LightningDataModule) -> None:
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
            raise ConfigError(
                f"{type(method).__name__}: stage {stage.tag} ({stage.kind}) needs {split} data, and none was given "
                f"(pass {fix})"
            )
    if method.needs_training_data and "train" not in held:
        raise ConfigError(
            f"{type(method).__name__} scores with training batches, and no training data was given (pass "
            "train=<DataLoader>)"
        )
