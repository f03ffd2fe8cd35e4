"""The one LightningModule: trains and evaluates any backbone; pruning methods act through hooks."""

from __future__ import annotations

import inspect
import random
import warnings
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from prunelab.distributed import global_mean
from prunelab.errors import NonFiniteError
from prunelab.methods.base import PruningMethod

# Every epoch value logged here is already the same on every DDP rank (torchmetrics sums its states
# over ranks; the training sums hold global-batch means), so Lightning's advice to average it is moot.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True")


def cosine(optimizer: torch.optim.Optimizer, epochs: int, eta_min: float = 0.0):
    """Cosine annealing over the stage's epochs, stepped per epoch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=eta_min)


def multistep(
    optimizer: torch.optim.Optimizer, epochs: int, milestones: Iterable[float] = (0.5, 0.75), gamma: float = 0.1
):
    """Step decay; milestones below 1 are fractions of the stage's epochs, others are epoch numbers."""
    steps = sorted({int(round(m * epochs)) if m < 1 else int(m) for m in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)


def constant(optimizer: torch.optim.Optimizer, epochs: int):
    """A constant learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class PruneLitModule(L.LightningModule):
    """Trains, validates and tests a classifier; a pruning method changes what is trained through hooks.

    Metrics are logged as `<stage>/<split>/<metric>` (e.g. `finetune/val/acc`, `round2/rewind/val/acc`)
    during fitting, and as `test/acc`, `test/acc5`, `test/loss` by a stage called "test" (under its
    round's prefix inside a round: `round2/test/acc`), `<stage>/test/acc` by any other test stage.
    Accuracies are percentages.

    Every training epoch starts from random states derived from `seed`, the stage and the epoch, so a
    stage resumed from the checkpoint of an epoch's end goes on exactly as if it had never stopped.
    The method's `state_module()` is registered here (it moves and is checkpointed with the model) and
    its `state_dict()` travels in the checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., object] | None = None,
        method: PruningMethod | None = None,
        label_smoothing: float = 0.0,
        stage: str = "train",
        seed: int = 0,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        # Only plain values go into the hyper-parameters, so checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "method"])
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.method = method if method is not None else PruningMethod()
        self.method_module = self.method.state_module()
        self.label_smoothing = label_smoothing
        self.stage = stage
        self.seed = seed
        self.channels_last = channels_last
        self.compile_model = compile
        self.stop_reason: str | None = None
        self.restored_metrics: dict[str, float] = {}
        top5 = min(5, num_classes)
        # The training epoch's running totals are part of the checkpoints (persistent), so a stage resumed
        # in the middle of an epoch reports the same epoch metrics as one that never stopped.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_acc.persistent(True)
        self.register_buffer("train_sums", torch.zeros(4, dtype=torch.float64))
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        # Sample-weighted means whose states sum over DDP ranks: every sample counts once.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_model:
            self.model.compile()

    def teardown(self, stage: str) -> None:
        # The model leaves the stage as an ordinary eager module in the default memory order (pruning,
        # export and the next stage see plain tensors); the next fit compiles it again if asked.
        if self.compile_model:
            self.model._compiled_call_impl = None
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(self._inputs(x))
        # Under DDP `ce` is the whole global batch's mean (the same on every rank); `objective` backpropagates it.
        objective, ce = global_mean(F.cross_entropy(logits, y, label_smoothing=self.label_smoothing, reduction="none"))
        self.log(f"{self.stage}/train/ce_step", ce, on_step=True, on_epoch=False)
        loss = ce
        extra = self.method.extra_loss(self.model)
        if extra is not None:
            self.log(f"{self.stage}/train/reg_step", extra, on_step=True, on_epoch=False)
            loss = loss + extra
            objective = objective + extra
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"stage {self.stage}: the training loss is {float(loss)} at step {self.global_step + 1} (epoch "
                f"{self.current_epoch}); lower the learning rate (optimizer.lr) or check the data"
            )
        self.train_acc.update(logits.detach(), y)
        reg = extra.detach().double() if extra is not None else ce.new_zeros((), dtype=torch.float64)
        self.train_sums += torch.stack(
            [ce.detach().double(), reg, loss.detach().double(), ce.new_ones((), dtype=torch.float64)]
        )
        self.log(f"{self.stage}/train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return objective

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # global_step still counts the steps before this one here.
        self.method.after_optimizer_step(self.model, self.global_step)
        for optimizer in self.trainer.optimizers:
            self.method.reset_optimizer_state(optimizer)
        reason = self.method.should_stop(self.model, self.global_step + 1)
        if reason:
            self.stop_reason = reason
            self.trainer.should_stop = True

    def on_train_epoch_start(self) -> None:
        _reseed(epoch_seed(self.seed, self.stage, self.current_epoch))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        self.method.on_train_epoch_start(self.model, self.current_epoch, epochs)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Every step's randomness (dropout, the method's sampling) is a function of its position alone.
        _reseed(epoch_seed(self.seed, self.stage, self.current_epoch, batch_idx))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prunelab_method"] = self.method.state_dict()
        checkpoint["prunelab_stop_reason"] = self.stop_reason
        # The stage's latest epoch metrics, for a resume that has no epoch left to run (the stage's end).
        latest = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if k.startswith(f"{self.stage}/") and v.numel() == 1
        }
        checkpoint["prunelab_metrics"] = {**self.restored_metrics, **latest}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "prunelab_method" in checkpoint:
            self.method.load_state_dict(checkpoint["prunelab_method"])
        self.stop_reason = checkpoint.get("prunelab_stop_reason")
        self.restored_metrics = dict(checkpoint.get("prunelab_metrics", {}))

    def on_train_start(self) -> None:
        # A stage that had met its stop condition when it was checkpointed ends where it ended.
        if self.stop_reason:
            self.trainer.should_stop = True

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(self._inputs(x))
        self.val_acc.update(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y, reduction="none"))

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(self._inputs(x))
        self.test_acc.update(logits, y)
        self.test_acc5.update(logits, y)
        self.test_loss.update(F.cross_entropy(logits, y, reduction="none"))

    # Accuracies are logged once per epoch, as percentages.
    def on_train_epoch_end(self) -> None:
        self._log_percent(f"{self.stage}/train/acc", self.train_acc)
        ce, reg, loss, steps = self.train_sums.tolist()
        if steps:
            self.log(f"{self.stage}/train/ce", ce / steps)
            self.log(f"{self.stage}/train/loss", loss / steps)
            if reg:
                self.log(f"{self.stage}/train/reg", reg / steps)
        self.train_sums.zero_()
        self.method.on_train_epoch_end(self.model, self.current_epoch)
        # What the optimizer trains (weights, gates, scores) must still be finite when the epoch is saved.
        for group in self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []:
            for p in group["params"]:
                if not torch.isfinite(p).all():
                    raise NonFiniteError(
                        f"stage {self.stage}: a trained tensor of shape {tuple(p.shape)} holds NaN or Inf after "
                        f"epoch {self.current_epoch}; lower the learning rate (optimizer.lr)"
                    )

    def on_validation_epoch_end(self) -> None:
        # The method sees each check's accuracy before the checkpoint is saved, so its choice is kept too.
        name = f"{self.stage}/val/acc"
        metrics = {name: float(self.val_acc.compute()) * 100.0} if self.val_acc.update_count else {}
        self._log_percent(name, self.val_acc, prog_bar=True)
        self._log_mean(f"{self.stage}/val/loss", self.val_loss)
        if not self.trainer.sanity_checking:
            self.method.on_validation_end(self.model, metrics)

    def on_test_epoch_end(self) -> None:
        self._log_percent(f"{self.test_prefix}test/acc", self.test_acc, prog_bar=True)
        self._log_percent(f"{self.test_prefix}test/acc5", self.test_acc5)
        self._log_mean(f"{self.test_prefix}test/loss", self.test_loss)

    @property
    def test_prefix(self) -> str:
        """A stage called "test" logs `test/...` (`round2/test/...` in round 2); any other `<stage>/test/...`."""
        if self.stage == "test":
            return ""
        if self.stage.endswith("/test"):
            return self.stage[: -len("test")]
        return f"{self.stage}/"

    def _log_percent(self, name: str, metric: MulticlassAccuracy, prog_bar: bool = False) -> None:
        if metric.update_count:
            self.log(name, metric.compute() * 100.0, prog_bar=prog_bar)
        metric.reset()

    def _log_mean(self, name: str, metric: MeanMetric) -> None:
        if metric.update_count:
            self.log(name, metric.compute())
        metric.reset()

    def on_fit_start(self) -> None:
        self.method.on_fit_start(self.model, self.stage, int(self.trainer.estimated_stepping_batches))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for name, value in self.method.step_metrics(self.model).items():
            self.log(f"{self.stage}/train/{name}", value, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("PruneLitModule needs an optimizer factory to train")
        optimizer = self.optimizer_factory(trainable(self.method.parameters_to_train(self.model), self.stage))
        if self.scheduler_factory is None:
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = build_scheduler(
            self.scheduler_factory, optimizer, epochs, int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}


def trainable(params: Iterable[Any], stage: str = "train") -> list[Any]:
    """The parameters (or torch parameter groups) that require gradients; empty groups are dropped."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"stage '{stage}': the method left no trainable parameters")
        return groups
    plain = [p for p in items if p.requires_grad]
    if not plain:
        raise ValueError(f"stage '{stage}': the method left no trainable parameters")
    return plain


def build_scheduler(factory: Callable[..., Any], optimizer: torch.optim.Optimizer, epochs: int, total_steps: int):
    """Call a scheduler factory with the optimizer and the stage's length, in the units it asks for.

    A factory receives `epochs` (the stage's epochs) and `total_steps` (its optimizer steps) if its
    signature names them, so prunelab's schedules and torch's own (e.g. OneCycleLR with
    `interval: step`) both work from config.
    """
    names = inspect.signature(factory).parameters
    kwargs = {key: value for key, value in (("epochs", epochs), ("total_steps", total_steps)) if key in names}
    return factory(optimizer, **kwargs)


def epoch_seed(seed: int, stage: str, epoch: int, batch: int | None = None) -> int:
    """The seed of one training epoch (or one of its batches) of one stage: a stable function of them."""
    key = f"{seed}/{stage}/{epoch}" if batch is None else f"{seed}/{stage}/{epoch}/{batch}"
    return zlib.crc32(key.encode())


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
