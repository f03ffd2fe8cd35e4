"""A pruning method inside a training loop of the user's own: `Pruner`, the method's hooks as calls.

prunelab's engine trains with its own LightningModule on the method's own schedule. `Pruner` hands the
same hooks to a loop the user writes: the model the method trains (with what it attaches), what to
optimise, the extra loss, the after-step update, the epoch hooks, the prune, and the method's state for
the user's checkpoints. The method is built exactly as `prunelab.prune` and the `prunelab` command
build it (the same composed config), and its plan is applied by the pipeline's own prune step.

A loop of the user's runs at most one training stage of the method and then one prune: the methods
whose own stages are that (after dropping the tests and the retraining, which the user's loop does
itself) work here; the others (several rounds of prune and rewind, a search on a new model of the
method's own) are refused in one line before any work.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from prunelab import structure
from prunelab.api import PruneResult, compose_config, user_data, user_overrides
from prunelab.budget import measure
from prunelab.data import LoaderDataModule
from prunelab.lit import trainable
from prunelab.methods.base import PruningMethod, Rounds, Stage
from prunelab.pipeline import Context, build, check_data, prune_stage
from prunelab.structure import MaskPlan, model_record
from prunelab.validate import ConfigError, check_config, check_layer_ratios, check_skip

#: The methods (`method=` choices, with their default settings) whose stages a loop of the user's can run.
IN_YOUR_LOOP = (
    "greg1",
    "greg2",
    "slimming",
    "jackpot",
    "edge_popup",
    "l1_filter",
    "taylor",
    "magnitude",
    "random",
    "uniform",
    "greedy",
    "snip",
    "grasp",
    "synflow",
    "lamp",
    "fpgm",
    "sfp",
    "hrank",
    "thinet",
    "depgraph",
    "set",
    "rigl",
)


def loop_method(
    method: str,
    budget: dict[str, Any] | None,
    overrides: Sequence[str],
    run_dir: Path,
    train: DataLoader[Any] | None = None,
) -> tuple[DictConfig, PruningMethod, Stage | None, Stage]:
    """Compose the config of `method=<method> budget.<k>=<v> <overrides>`, check it and build the method.

    Returns the config, the method, its training stage (None for a one-shot method) and its prune
    stage. A setting that cannot work, a method whose stages a user's loop cannot run, or one that
    scores with training batches while no `train` loader is given raises a one-line `ConfigError`.
    """
    user_overrides("Pruner", overrides)
    cfg = compose_config(method, dict(budget or {}), overrides, run_dir=run_dir)
    check_config(cfg)
    built = build(cfg.method)
    if type(built).initial_model is not PruningMethod.initial_model:
        raise ConfigError(
            f"method={method} starts from a new model of its own, not from yours (methods that fit your loop: "
            f"{', '.join(IN_YOUR_LOOP)})"
        )
    own: list[Stage] = []
    for item in built.stages():
        own.extend(item.expand() if isinstance(item, Rounds) else [item])
    # The user's loop tests and retrains as it likes: the method's own tests and retraining are its part.
    kept = [s for s in own if s.kind not in ("test", "retrain")]
    kinds = [s.kind for s in kept]
    if kinds not in (["prune"], ["fit", "prune"]):
        what = ", ".join(f"{s.tag} ({s.kind})" for s in own) or "no stage"
        raise ConfigError(
            f"method={method} runs {what}: a loop of yours runs at most one training stage, then one prune "
            f"(methods that fit your loop: {', '.join(IN_YOUR_LOOP)})"
        )
    if built.budget_keys and all(cfg.budget.get(k) is None for k in built.budget_keys):
        wanted = " or ".join(f"budget.{k}" for k in built.budget_keys)
        raise ConfigError(f"{type(built).__name__} prunes to a budget: set {wanted}")
    check_data([], built, LoaderDataModule((), 1, train))
    return cfg, built, (kept[0] if len(kept) == 2 else None), kept[-1]


class Pruner:
    """A pruning method's hooks for a plain PyTorch training loop of the user's own.

    `Pruner(model, method, budget, example_inputs)` composes the config `prunelab method=<method>
    budget.<key>=<value> <overrides>` would, builds the method and prepares `model` for the method's
    training stage (attaching gates, masks or scores). `model` is used in place, not copied. Then, in
    the user's loop::

        optimizer = torch.optim.SGD(pruner.parameters(), lr=0.01)
        for inputs, labels in loader:
            loss = F.cross_entropy(pruner.model(inputs), labels) + pruner.extra_loss()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            if pruner.after_step(optimizer):
                break
        result = pruner.prune()

    The method's own schedule (its stage's optimizer, learning rate, epochs) is left to the loop; what
    it trains, adds and updates is the method's. `budget`, `overrides`, `example_inputs` and
    `num_classes` are as for `prunelab.prune`; `train` is a DataLoader of (inputs, labels) batches for the
    methods that read training batches (taylor, greedy; jackpot's snip and grasp criteria); `steps` is
    the optimizer steps the training will take, which methods with a schedule over the whole search
    need (jackpot, edge_popup), also settable with `fit_start`. The method's records (e.g. GReg's
    penalty history) and the plan are written to `run_dir` (default: a new temporary directory).
    Mistakes, and methods a user's loop cannot run (`IN_YOUR_LOOP` lists those that it can), raise a
    one-line `ConfigError` here, before any work.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        budget: dict[str, Any] | None = None,
        example_inputs: torch.Tensor | None = None,
        *,
        train: DataLoader[Any] | None = None,
        num_classes: int | None = None,
        steps: int | None = None,
        overrides: Sequence[str] = (),
        run_dir: str | Path | None = None,
    ) -> None:
        overrides = list(overrides)
        if steps is not None:
            _check_steps(steps)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="prunelab-"))
        cfg, self.method, self.stage, self._prune_stage = loop_method(method, budget, overrides, self.run_dir, train)
        example_inputs, data = user_data(model, example_inputs, num_classes, train)
        shape = tuple(example_inputs.shape[1:])
        if cfg.budget.get("layer_ratios"):
            check_layer_ratios(list(cfg.budget.layer_ratios), model)
        # What the pipeline records on a model before its stages: its shape and the structure settings.
        record = model_record(model)
        record.input_shape = shape
        record.skip = check_skip(list(cfg.get("structure", {}).get("skip") or []), model)
        record.prune_embedding = bool(cfg.get("structure", {}).get("prune_embedding", False))
        record.prune_head_dim = bool(cfg.get("structure", {}).get("prune_head_dim", False))
        channels = ("flops", "params", "latency", "layer_ratios")
        if "flops" in self.method.budget_keys and any(cfg.budget.get(k) is not None for k in channels):
            structure.check_prunable(model, shape)
        self._ctx = Context(
            cfg=cfg, run_dir=self.run_dir, datamodule=data, method=self.method, input_shape=shape, base=model
        )
        self._ctx.dense = measure(model, shape)
        self.method.bind(self._ctx.for_method(model))
        if self.stage is not None:
            model = self.method.setup(model, self.stage, self._ctx.for_method(model, self.stage))
        #: The model to train and call: the user's, with what the method attached for its training.
        self.model = model
        #: Optimizer steps seen by `after_step`, and the method's reason to end its training, once given.
        self.steps = 0
        self.stop_reason: str | None = None
        self.result: PruneResult | None = None
        #: Whether the method's schedule spans the whole training, so that it must hear its length first (`fit_start`).
        self.needs_steps = type(self.method).on_fit_start is not PruningMethod.on_fit_start and self.stage is not None
        self._started = False
        if steps is not None:
            self.fit_start(steps)

    @property
    def pruned(self) -> bool:
        """Whether `prune` has run (the method's hooks are over; the model is the pruned one)."""
        return self.result is not None

    def fit_start(self, steps: int) -> None:
        """Tell the method the training's length in optimizer steps (call before the first step, again on a resume)."""
        _check_steps(steps)
        if self.stage is not None:
            self.method.on_fit_start(self.model, self.stage.tag, steps)
        self._started = True

    def parameters(self) -> list[Any]:
        """What the optimizer updates: parameters, or torch parameter groups with their own settings.

        During the method's training these are what it trains (e.g. only the mask scores of jackpot,
        the weights and the relaxed masks without weight decay of concave); after `prune`, the pruned
        model's parameters (a structured prune replaces them: build a new optimizer on these).
        """
        if self.pruned or self.stage is None:
            return trainable(self.model.parameters())
        return trainable(self.method.parameters_to_train(self.model), self.stage.tag)

    def extra_loss(self) -> torch.Tensor:
        """The term to add to the task loss (a regulariser), a zero tensor when the method adds none."""
        self._check_started()
        extra = None if self.pruned else self.method.extra_loss(self.model)
        if extra is None:
            return torch.zeros((), device=_device(self.model))
        return extra

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> str | None:
        """Call after every `optimizer.step()`: the method's update (grow a penalty, swap masks, project).

        Returns the method's reason to end its training (e.g. GReg's "lambda passed tau ..., then K_s
        steps"), else None: time to call `prune`. After `prune`, an unstructured plan's pruned weights are
        set back to zero here, so fine-tuning keeps them pruned. `optimizer` is the loop's: the methods that
        clear its state for what their update made anew (set and rigl zero the momentum of the connections
        they grow, as RigL's code does) need it, and refuse to go on without it.
        """
        self._check_started()
        if self.result is not None:  # pruned
            if isinstance(self.result.plan, MaskPlan):
                structure.zero_masked_(self.model, self.result.plan)
            return None
        resets = type(self.method).reset_optimizer_state is not PruningMethod.reset_optimizer_state
        if resets and optimizer is None:
            raise ConfigError(
                f"{type(self.method).__name__} resets the optimizer's state of what its updates make anew: "
                "call after_step(optimizer)"
            )
        self.method.after_optimizer_step(self.model, self.steps)
        if optimizer is not None:
            self.method.reset_optimizer_state(optimizer)
        self.steps += 1
        reason = self.method.should_stop(self.model, self.steps)
        if reason and self.stop_reason is None:
            self.stop_reason = reason
        return reason

    def epoch_start(self, epoch: int, epochs: int) -> None:
        """Call at the start of every training epoch (0-based) of `epochs` (e.g. a temperature schedule)."""
        if not self.pruned:
            self.method.on_train_epoch_start(self.model, epoch, epochs)

    def epoch_end(self, epoch: int) -> None:
        """Call at the end of every training epoch."""
        if not self.pruned:
            self.method.on_train_epoch_end(self.model, epoch)

    def metrics(self) -> dict[str, float]:
        """The method's values of the last step, for a logger (e.g. GReg's lambda, jackpot's swaps)."""
        return {} if self.pruned else self.method.step_metrics(self.model)

    def prune(self) -> PruneResult:
        """End the method's training and prune, as the pipeline's prune stage does; returns the result.

        Structured methods remove channels physically (FLOPs and parameters drop); unstructured ones
        zero the pruned weights and record the MaskPlan on the model (`after_step` keeps them at zero
        while the loop fine-tunes). `result.model` is the pruned model (also `pruner.model`), changed in
        place; `result.plan` its ChannelPlan or MaskPlan; `result.report` its `model/flops`,
        `model/params`, their ratios to the dense model's and `model/sparsity`.
        """
        if self.pruned:
            raise RuntimeError("this Pruner has already pruned its model")
        model = self.model
        if self.stage is not None:
            model = self.method.teardown(model, self.stage)
        stage = self._prune_stage
        model = self.method.setup(model, stage, self._ctx.for_method(model, stage))
        _, model = prune_stage(self._ctx, stage, self.run_dir / "prune", model)
        model = self.method.teardown(model, stage)
        record = model_record(model)
        plan = record.masks if record.masks is not None else record.plans[-1]
        now, dense = measure(model, self._ctx.input_shape), self._ctx.dense
        report = {
            "dense/flops": dense["flops"],
            "dense/params": dense["params"],
            "model/flops": now["flops"],
            "model/params": now["params"],
            "model/flops_ratio": now["flops"] / dense["flops"] if dense["flops"] else 1.0,
            "model/params_ratio": now["params"] / dense["params"] if dense["params"] else 1.0,
            "model/sparsity": plan.sparsity() if isinstance(plan, MaskPlan) else now["sparsity"],
        }
        self.model = model
        self.result = PruneResult(model, plan, report, self.run_dir)
        return self.result

    def state_dict(self) -> dict[str, Any]:
        """The method's state and the step count, for a checkpoint of the user's (tensors and plain values).

        What the method attached to the model (scores, relaxed masks) is in `model.state_dict()`.
        """
        module = self.method.state_module()
        return {
            "method": self.method.state_dict(),
            "method_module": module.state_dict() if module is not None else None,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "pruned": self.pruned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` into a Pruner made as the saved one was, before its model was pruned."""
        if state.get("pruned") or self.pruned:
            raise ValueError(
                "a Pruner's state loads only before pruning; reload a pruned model with prunelab.load_model"
            )
        self.method.load_state_dict(state["method"])
        module = self.method.state_module()
        if module is not None and state.get("method_module") is not None:
            module.load_state_dict(state["method_module"])
        self.steps = int(state["steps"])
        self.stop_reason = state.get("stop_reason")

    def _check_started(self) -> None:
        if self.needs_steps and not self._started:
            raise ConfigError(
                f"{type(self.method).__name__} schedules its search over the whole training: "
                "pass steps=<optimizer steps> or call fit_start(steps) first"
            )


def _check_steps(steps: Any) -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ConfigError(f"steps={steps!r} must be a whole number >= 1 (the optimizer steps of your training)")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
