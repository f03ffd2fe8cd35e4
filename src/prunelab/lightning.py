"""A pruning method inside the user's own LightningModule and Trainer: the `Pruning` callback.

The callback drives a `Pruner` (prunelab.hooks) from Lightning's callback hooks: the method prepares the
model when the fit is set up (before `configure_optimizers`, so the optimizer sees what the method
trains), its extra loss's gradient joins the task loss's after every backward pass, its after-step
update runs after every optimizer step, its epoch hooks at every epoch, its state travels in the
Trainer's checkpoints, and the model is pruned at the end of the fit or after a given epoch.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from prunelab.api import PruneResult
from prunelab.hooks import Pruner, loop_method
from prunelab.validate import ConfigError


class Pruning(Callback):
    """Train and prune with a prunelab method in your own LightningModule and Trainer.

    `Pruning(method, budget, example_inputs)` takes what `prunelab.Pruner` takes (and builds one when
    the fit is set up); `submodule` names the LightningModule's attribute holding the network to prune
    (e.g. "net"; None: the LightningModule itself). `prune_at` is "fit_end" (prune when the fit ends,
    which the method ends once its training is over, e.g. GReg's penalty reached tau and K_s steps
    followed) or a number n of epochs: prune once n training epochs have ended (or the method's
    training is over) and go on training the pruned model, with the optimizers and schedulers
    `configure_optimizers` builds anew.

    Lightning callbacks cannot change the loss, so the method's extra loss is added as its gradient:
    after every backward pass of the task loss, the extra loss is evaluated at the same weights and its
    gradient added to the parameters' (divided by `accumulate_grad_batches`, times the mixed-precision
    loss scale), which is the gradient of the task loss plus the extra loss. In `configure_optimizers`,
    `pruning.parameters()` gives what the method trains (e.g. only the mask scores of jackpot; all
    parameters for the regularisers, where `self.parameters()` does the same).

    After the fit, `pruning.result` holds the `PruneResult` (model, plan, report) and the
    LightningModule holds the pruned network. A checkpoint saved after a structured prune inside the fit
    does not resume into an unpruned model (reload the network with `prunelab.load_model`). Made for one
    process: under DDP every process would run the method alike, which is untested.
    """

    def __init__(
        self,
        method: str,
        budget: dict[str, Any] | None = None,
        example_inputs: torch.Tensor | None = None,
        *,
        submodule: str | None = None,
        prune_at: str | int = "fit_end",
        train: DataLoader[Any] | None = None,
        num_classes: int | None = None,
        overrides: Sequence[str] = (),
        run_dir: str | Path | None = None,
    ) -> None:
        if not (
            prune_at == "fit_end" or (isinstance(prune_at, int) and not isinstance(prune_at, bool) and prune_at >= 1)
        ):
            raise ConfigError(f"prune_at={prune_at!r} must be 'fit_end' or a number of epochs >= 1")
        if example_inputs is None and train is None:
            raise ConfigError("Pruning needs example_inputs (a batch of inputs) or train=<DataLoader>")
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="prunelab-"))
        # Every setting is checked now, before the Trainer does any work.
        loop_method(method, budget, overrides, self.run_dir, train)
        self._settings: dict[str, Any] = dict(
            method=method,
            budget=budget,
            example_inputs=example_inputs,
            train=train,
            num_classes=num_classes,
            overrides=list(overrides),
            run_dir=self.run_dir,
        )
        self.submodule = submodule
        self.prune_at = prune_at
        #: The Pruner driving the method (from the fit's setup on), and the result once pruned.
        self.pruner: Pruner | None = None
        self.result: PruneResult | None = None
        self._steps_seen = 0

    def parameters(self) -> list[Any]:
        """What the optimizer in `configure_optimizers` updates (see `Pruner.parameters`)."""
        if self.pruner is None:
            raise RuntimeError("Pruning.parameters() is ready once the fit is set up (call it in configure_optimizers)")
        return self.pruner.parameters()

    @property
    def _driver(self) -> Pruner:
        """The Pruner, which the fit's setup builds (Lightning calls `setup` before any other hook of the fit)."""
        if self.pruner is None:
            raise RuntimeError("the Pruning callback's Pruner is built when the fit is set up")
        return self.pruner

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.pruner is not None:
            return
        self.pruner = Pruner(self._network(pl_module), **self._settings)
        self._place(pl_module, self.pruner.model)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._driver.needs_steps and not self._driver.pruned:
            steps = trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                name = type(self._driver.method).__name__
                raise ConfigError(
                    f"{name} schedules its search over the whole training: give the Trainer max_steps or max_epochs"
                )
            self._driver.fit_start(max(1, int(steps)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed fit has already taken the checkpoint's steps.
        self._steps_seen = trainer.global_step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        extra = self._driver.extra_loss()
        if not extra.requires_grad:
            return
        params = [p for p in self._trained() if p.requires_grad]
        # The task loss was divided by the batches accumulated into one step and scaled for mixed precision.
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        grads = torch.autograd.grad(extra * scale if scale != 1.0 else extra, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # An optimizer step happened in this batch when the global step moved (not on accumulating batches).
        if trainer.global_step == self._steps_seen:
            return
        self._steps_seen = trainer.global_step
        reason = self._driver.after_step(trainer.optimizers[0] if len(trainer.optimizers) == 1 else None)
        if not reason:
            return
        if self.prune_at == "fit_end":
            trainer.should_stop = True
        else:
            self._prune(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        self._driver.epoch_start(trainer.current_epoch, epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._driver.epoch_end(trainer.current_epoch)
        if isinstance(self.prune_at, int) and trainer.current_epoch + 1 >= self.prune_at and not self._driver.pruned:
            self._prune(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._driver.pruned:
            self.result = self._driver.prune()
            self._place(pl_module, self.result.model)

    def state_dict(self) -> dict[str, Any]:
        return {"pruner": self.pruner.state_dict()} if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "pruner" in state_dict:
            self._driver.load_state_dict(state_dict["pruner"])

    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prune inside the fit: the training goes on with the pruned network and new optimizers."""
        self.result = self._driver.prune()
        self._place(pl_module, self.result.model)
        trainer.strategy.setup_optimizers(trainer)

    def _network(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module if self.submodule is None else pl_module.get_submodule(self.submodule)

    def _place(self, pl_module: L.LightningModule, model: nn.Module) -> None:
        """Put the method's model where the network was, when the method replaced it."""
        if self._network(pl_module) is model:
            return
        if self.submodule is None:
            raise RuntimeError(
                f"{type(self._driver.method).__name__} replaced the network: name it with Pruning(submodule=...)"
            )
        parent, _, name = self.submodule.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, name, model)

    def _trained(self) -> list[nn.Parameter]:
        module = self._driver.method.state_module()
        return list(self._driver.model.parameters()) + (list(module.parameters()) if module is not None else [])
