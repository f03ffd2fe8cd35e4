"""What the stages of one experiment share (`Context`), and the one owner of rewinding (`Rewind`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from prunelab import structure
from prunelab.export import load_model, save_model
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.structure import model_record


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
    input_shape: tuple[int, ...]
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
        """The narrow view a method gets of the experiment, with the model's current masks."""
        info = model_record(model)
        return MethodContext(
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
            masks=info.masks,
        )
