"""The one LightningModule: trains and evaluates any backbone; pruning methods act through hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prunelab.methods.base import PruningMethod


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

    Metrics are logged as `<stage>/<split>/<metric>` (e.g. `finetune/val/acc`) during fitting, and as
    `test/acc`, `test/acc5`, `test/loss` by the final test (`<stage>/test/acc` by an earlier one).
    Accuracies are percentages.
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
    ):
        super().__init__()
        # Only plain values go into the hyper-parameters, so checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "method"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.method = method if method is not None else PruningMethod()
        self.label_smoothing = label_smoothing
        self.stage = stage
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log(f"{self.stage}/train/ce", loss, on_step=True, on_epoch=True)
        extra = self.method.extra_loss(self.model)
        if extra is not None:
            self.log(f"{self.stage}/train/reg", extra, on_step=True, on_epoch=True)
            loss = loss + extra
        self.train_acc.update(logits.detach(), y)
        self.log(f"{self.stage}/train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.method.after_optimizer_step(self.model, self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc.update(logits, y)
        self.log(f"{self.stage}/val/loss", loss, on_epoch=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.test_acc.update(logits, y)
        self.test_acc5.update(logits, y)
        self.log(f"{self._test_prefix}test/loss", loss, on_epoch=True, sync_dist=True)

    # Accuracies are logged once per epoch, as percentages.
    def on_train_epoch_end(self) -> None:
        self._log_percent(f"{self.stage}/train/acc", self.train_acc)
        self.method.on_train_epoch_end(self.model, self.current_epoch)

    def on_validation_epoch_end(self) -> None:
        # The method sees each check's accuracy before the checkpoint is saved, so its choice is kept too.
        name = f"{self.stage}/val/acc"
        metrics = {name: float(self.val_acc.compute()) * 100.0} if self.val_acc.update_count else {}
        self._log_percent(name, self.val_acc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.method.on_validation_end(self.model, metrics)

    def on_test_epoch_end(self) -> None:
        self._log_percent(f"{self._test_prefix}test/acc", self.test_acc, prog_bar=True)
        self._log_percent(f"{self._test_prefix}test/acc5", self.test_acc5)

    @property
    def _test_prefix(self) -> str:
        """The final evaluation logs `test/...`; an earlier one (e.g. of the dense model) `<stage>/test/...`."""
        return "" if self.stage == "test" else f"{self.stage}/"

    def _log_percent(self, name: str, metric: MulticlassAccuracy, prog_bar: bool = False) -> None:
        if metric.update_count:
            self.log(name, metric.compute() * 100.0, prog_bar=prog_bar)
        metric.reset()

    def on_fit_start(self) -> None:
        self.method.on_fit_start(self.model, self.stage, int(self.trainer.estimated_stepping_batches))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for name, value in self.method.step_metrics(self.model).items():
            self.log(f"{self.stage}/train/{name}", value, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("PruneLitModule needs an optimizer factory to train")
        params = [p for p in self.method.parameters_to_train(self.model) if p.requires_grad]
        if not params:
            raise ValueError(f"stage '{self.stage}': the method left no trainable parameters")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = self.scheduler_factory(optimizer, epochs=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

