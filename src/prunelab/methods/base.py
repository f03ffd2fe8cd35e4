"""The plug-in interface of pruning methods: a list of stages and hooks that default to no effect."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Stage:
    """One step of an experiment.

    `kind` tells the pipeline how to run it: "fit" trains with Lightning (with the method's hooks), "prune"
    asks the method for a plan and applies it, "recalibrate" re-estimates BatchNorm statistics,
    "retrain" prepares the pruned model by `retrain.mode` and fits it, "test" evaluates. `epochs`, `lr`,
    `optimizer` and `scheduler` give a fit stage its schedule; None falls back to the experiment's
    `trainer.max_epochs`, `optimizer` (with its lr) and `scheduler`. `options["trainer"]` holds Trainer
    arguments for this stage only (e.g. `val_check_interval`).
    """

    name: str
    kind: str
    epochs: int | None = None
    lr: float | None = None
    optimizer: Any = None
    scheduler: Any = None
    options: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """Base class of every method; each hook left alone changes nothing.

    A method is one file plus one YAML in `conf/method/`; the pipeline and the LightningModule call
    its hooks and never name a method.
    """

    def stages(self) -> list[Stage]:
        """The method's own stages in order; the default trains the dense model.

        When they include a "prune" stage, the pipeline adds dense pre-training (`pretrain.epochs`), an
        evaluation of the dense model, BN re-estimation and retraining around them (see pipeline.py).
        """
        return [Stage("train", "fit")]

    def plan(self, model: nn.Module, ctx: Any) -> Any:
        """The ChannelPlan or MaskPlan for a "prune" stage; `ctx` holds the config, data and input shape."""
        raise NotImplementedError(f"{type(self).__name__} has a prune stage but no plan()")

    def bind(self, ctx: Any) -> None:
        """Called once before any stage with the pipeline's Context (config, datamodule, run directory, seed)."""

    def initial_model(self, model: nn.Module) -> nn.Module:
        """The model the method starts from, given the dense backbone (already measured as the reference).

        E.g. Pruning from Scratch returns a wider, randomly initialised copy; FLOPs budgets stay
        relative to the dense backbone.
        """
        return model

    def setup(self, model: nn.Module, stage: Stage) -> nn.Module:
        """Prepare the model before a stage runs (attach gates, masks or scores); returns the model."""
        return model

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """Undo what `setup` attached once the stage is over; returns the model."""
        return model

    def parameters_to_train(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates during a fit stage."""
        return model.parameters()

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (a regulariser), or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (grow a penalty, swap masks, project values)."""

    def on_fit_start(self, model: nn.Module, stage: str, total_steps: int) -> None:
        """Called when a fit stage starts or resumes; `total_steps` is the stage's optimizer steps in all."""

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Values to log after every training step, as `<stage>/train/<name>` (e.g. swaps made)."""
        return {}

    def on_validation_end(self, model: nn.Module, metrics: dict[str, float]) -> None:
        """Called after every validation check of a fit stage (not the sanity check), with its metrics."""

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called at the end of every training epoch."""


def prunable_groups(model: nn.Module, ctx: Any) -> list:
    """The channel groups a structured method may prune under the experiment's budget settings."""
    from prunelab.structure import channel_groups

    groups = channel_groups(model, ctx.input_shape)
    if not ctx.budget.get("prune_coupled", True):
        groups = [g for g in groups if not g.coupled]
    return groups
