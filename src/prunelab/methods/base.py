"""The plug-in interface of pruning methods: stages (and rounds of them), a narrow context, and hooks
that default to no effect."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.structure import ChannelPlan, MaskPlan, channel_groups


@dataclass
class Stage:
    """One step of an experiment.

    `kind` tells the pipeline how to run it: "fit" trains with Lightning (with the method's hooks),
    "prune" asks the method for a plan and applies it, "rewind" restores the weights saved at training
    iteration `retrain.rewind_iteration` under the current structure and masks, "recalibrate"
    re-estimates BatchNorm statistics, "retrain" prepares the pruned model by `retrain.mode` (keep,
    re-initialise or rewind the weights) and fits it on the `retrain` schedule, "test" evaluates.

    `epochs`, `lr`, `optimizer` and `scheduler` give a fit stage its schedule; None falls back to the
    experiment's `trainer.max_epochs`, `optimizer` (with its lr) and `scheduler`. `max_steps` caps a fit
    stage's optimizer steps (the safety net of a stage that ends on the method's condition, see
    `PruningMethod.should_stop`). `options["trainer"]` holds Trainer arguments for this stage only (e.g.
    `val_check_interval`). `round` is set by the pipeline for the stages of a `Rounds` block (None
    outside of one).
    """

    name: str
    kind: str
    epochs: int | None = None
    lr: float | None = None
    optimizer: Any = None
    scheduler: Any = None
    max_steps: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    round: int | None = None

    @property
    def tag(self) -> str:
        """The stage's name in metric keys and logs: `prune`, or `round2/prune` inside round 2."""
        return self.name if self.round is None else f"round{self.round}/{self.name}"


@dataclass
class Rounds:
    """A block of stages that repeats `count` times, numbered from `start` (e.g. train -> prune -> rewind).

    Each repetition's stages carry their round number (`Stage.round`, `MethodContext.round`); their
    directories are `stages/r<round>-<index in the block>-<name>` and their metrics `round<r>/...`.
    """

    stages: list[Stage]
    count: int
    start: int = 1

    def expand(self) -> list[Stage]:
        """The block's stages, once per round, each a copy tagged with its round."""
        return [replace(stage, round=r) for r in range(self.start, self.start + self.count) for stage in self.stages]


@dataclass
class MethodContext:
    """What a method may know of the experiment: handed to `bind`, `setup` and `plan`, and only what methods read.

    `budget` is the experiment's budget; `data` its datamodule; `input_shape` one example's (C, H, W);
    `dense` the dense backbone's `flops` and `params` (budgets are relative to them); `pretrained` whether
    the model starts from trained weights; `round` the current round (None outside of `Rounds`); `masks`
    the unstructured masks the model carries now (what earlier rounds decided). A method's own settings
    are its constructor's arguments.
    """

    budget: Any
    data: Any
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    run_dir: Path
    dense: dict[str, float] = field(default_factory=dict)
    pretrained: bool = False
    logger: Any = None
    round: int | None = None
    masks: MaskPlan | None = None


class PruningMethod:
    """Base class of every method; each hook left alone changes nothing.

    A method is one file plus one YAML in `conf/method/`; the pipeline and the LightningModule call
    its hooks and never name a method. A method checks its own settings in its constructor, raising
    `prunelab.validate.ConfigError`, which stops a run before any work.
    """

    #: The budget settings the method can prune to; unless one of them is set, a run stops before any work.
    budget_keys: tuple[str, ...] = ()
    #: Whether `plan()` reads training batches (data-driven scores): a run without training data stops before any work.
    needs_training_data: bool = False

    def stages(self) -> Sequence[Stage | Rounds]:
        """The method's own stages in order; the default trains the dense model.

        When they include a "prune" stage, the pipeline adds dense pre-training (`pretrain.epochs`), an
        evaluation of the dense model, BN re-estimation after each prune and, unless the method places
        a "retrain" stage itself, retraining at the end (see `plan_stages` in pipeline/stages.py).
        """
        return [Stage("train", "fit")]

    def bind(self, ctx: MethodContext) -> None:
        """Called once before any stage (e.g. to warn about settings that will not work well)."""

    def initial_model(self, model: nn.Module) -> nn.Module:
        """The model the method starts from, given the dense backbone (already measured as the reference).

        E.g. Pruning from Scratch returns a wider, randomly initialised copy; FLOPs budgets stay
        relative to the dense backbone.
        """
        return model

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        """Prepare the model before a stage runs (attach gates, masks or scores); returns the model."""
        return model

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """Undo what `setup` attached once the stage is over; returns the model."""
        return model

    def plan(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan | MaskPlan:
        """The ChannelPlan or MaskPlan of a "prune" stage."""
        raise NotImplementedError(f"{type(self).__name__} has a prune stage but no plan()")

    def parameters_to_train(self, model: nn.Module) -> Iterable[nn.Parameter] | Iterable[dict[str, Any]]:
        """What the optimizer of a fit stage updates: parameters, or parameter groups.

        A group is a dict in torch's format, `{"params": [...], "lr": ..., "weight_decay": ...}`; its
        own settings override the stage's optimizer (e.g. mask scores without weight decay).
        """
        return model.parameters()

    def state_module(self) -> nn.Module | None:
        """A module holding the method's trainable tensors outside the model (e.g. channel gates), or None.

        The LightningModule registers it during a fit stage, so it moves to the model's device and is
        saved in, and restored from, the stage's Lightning checkpoints with the model.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """The method's state that must survive a resume (a growing penalty, chosen indices, a selection).

        Tensors and plain values only. It is saved in every Lightning checkpoint (mid-stage) and with
        every stage's output, and given back through `load_state_dict` when a run resumes.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (a regulariser), or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (grow a penalty, swap masks, project values)."""

    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Called right after `after_optimizer_step` with the optimizer of the fit stage: clear the state it keeps
        (momentum, Adam's moments) for what that update made anew (e.g. RigL's grown connections)."""

    def should_stop(self, model: nn.Module, step: int) -> str | None:
        """Checked after every optimizer step: a reason to end the fit stage now (e.g. "lambda reached tau"), or
        None."""
        return None

    def on_fit_start(self, model: nn.Module, stage: str, total_steps: int) -> None:
        """Called when a fit stage starts or resumes; `total_steps` is the stage's optimizer steps in all."""

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Values to log after every training step, as `<stage>/train/<name>` (e.g. swaps made)."""
        return {}

    def on_validation_end(self, model: nn.Module, metrics: dict[str, float]) -> None:
        """Called after every validation check of a fit stage (not the sanity check), with its metrics."""

    def on_train_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called at the start of every training epoch (0-based) of a fit stage of `epochs` epochs (e.g. a temperature
        schedule)."""

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called at the end of every training epoch."""


def sgd(lr: float, momentum: float, weight_decay: float) -> dict[str, Any]:
    """The optimizer node (a Hydra partial) of a method's own SGD fit stage."""
    return {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
    }


def training_batches(data, count: int) -> list:
    """The first `count` training batches with test-time transforms, in a fixed order, for data-driven scores."""
    batches = []
    for x, y in data.train_eval_dataloader():
        batches.append((x, y))
        if len(batches) >= count:
            break
    return batches


def class_balanced_batches(data, num_classes: int, per_class: int, count: int = 1) -> list:
    """`count` samples of `per_class` training images of every class, each ordered by class and cut into halves.

    GraSP's official sampler (a batch of `per_class` images per class, concatenated class by class, whose
    two halves are fed separately); the images come with test-time transforms, in the fixed order of
    `train_eval_dataloader`, so sample i holds the i-th `per_class` images of each class.
    """
    wanted = per_class * count
    xs: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    for x, y in data.train_eval_dataloader():
        for image, label in zip(x, y.tolist()):
            if len(xs[label]) < wanted:
                xs[label].append(image)
        if all(len(found) == wanted for found in xs):
            break
    short = [c for c, found in enumerate(xs) if len(found) < wanted]
    if short:
        raise ValueError(f"class-balanced sampling: class {short[0]} has fewer than {wanted} training images")
    batches = []
    for i in range(count):
        images = torch.stack([image for found in xs for image in found[i * per_class : (i + 1) * per_class]])
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        half = images.shape[0] // 2
        batches += [(images[:half], labels[:half]), (images[half:], labels[half:])]
    return batches


def prunable_groups(model: nn.Module, ctx: MethodContext) -> list:
    """The channel groups a structured method may prune under the experiment's budget settings."""
    groups = channel_groups(model, ctx.input_shape)
    if not ctx.budget.get("prune_coupled", True):
        groups = [g for g in groups if not g.coupled]
    return groups
