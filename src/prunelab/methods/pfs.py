"""Pruning from Scratch (Wang et al., AAAI 2020): channel gates learned on frozen random weights.

The method starts from a freshly initialised backbone widened by `expansion` (1.25 in the paper; a
width multiplier scales every layer, so a ResNet's block inputs and outputs grow together). Its
`search` stage attaches one scalar gate to every prunable channel, multiplied onto the channel after
its BatchNorm (folded into the BatchNorm's weight and bias, which is the same product without an
activation-sized multiplication), and trains only the gates with Adam on

    cross-entropy + gamma * (sum_j ||lambda_j||_1 / sum_j C_j - r)^2,

clamping them to [0, 1] after each step, as the official code does. Weights and BatchNorm parameters
stay frozen (they do not even require gradients, so the backward pass computes no weight gradient).
The gates are the method's own module (`state_module`), not part of the model: they move to the
device and into the search's checkpoints with it, and the selected gates are the method's state,
saved with the search stage's output, so a resumed run prunes by the same gates.
Of all validation checks, the gates kept are those with the best accuracy among the checks whose
density (fraction of non-zero gates) is at most r; when no check qualifies, the final gates. The
`prune` stage then keeps the channels with the largest gates, one global threshold binary-searched
until the pruned architecture's measured FLOPs are within `budget.tolerance` of `budget.flops` of the
dense, unexpanded backbone (Algorithm 1). Scratch-B training of the result is `retrain=scratch_b`,
which the experiment presets `pfs_*` select.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from prunelab.backbones import load_pretrained, rebuild
from prunelab.budget import structured_plan
from prunelab.errors import ConfigError
from prunelab.io import write_json
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.structure import PRUNABLE_TYPES, ChannelGroup, channel_groups, eval_mode, freeze, model_record, unfreeze
from prunelab.targets import TARGET, locate, parameters

log = logging.getLogger("prunelab")

# The name of the gate search stage.
SEARCH = "search"


class ChannelGates(nn.Module):
    """The gates of a search: one vector per channel group, all starting at one.

    The module also keeps the gates it should hand over at the end (`best`, from the validation check
    with the best accuracy among those whose density is at most the target ratio; `best_acc` is -1
    until a check qualifies) and counts the checks. All of it is in the state dict, so a search that
    resumes from a Lightning checkpoint goes on with the same gates and the same selection.
    """

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.names = list(sizes)
        self.sizes = [int(n) for n in sizes.values()]
        self.gates = nn.ParameterList([nn.Parameter(torch.ones(n)) for n in self.sizes])
        self.register_buffer("best", torch.ones(sum(self.sizes)))
        self.register_buffer("best_acc", torch.tensor(-1.0))
        self.register_buffer("best_check", torch.tensor(-1))
        self.register_buffer("checks", torch.tensor(0))

    def flat(self) -> torch.Tensor:
        """All gates in one vector, in group order."""
        return torch.cat(list(self.gates))

    def by_group(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector laid out like `flat()` into per-group tensors (detached, on the CPU)."""
        return dict(zip(self.names, torch.split(flat.detach().cpu().clone(), self.sizes)))

    def record(self, acc: float, ratio: float) -> dict[str, float]:
        """Note one validation check; keep the current gates if they are the best admissible so far."""
        flat = self.flat().detach()
        density = float((flat != 0).float().mean())
        self.checks += 1
        selected = density <= ratio and acc > float(self.best_acc)
        if selected:
            self.best.copy_(flat)
            self.best_acc.fill_(acc)
            self.best_check.copy_(self.checks)
        return {"check": int(self.checks), "acc": acc, "density": density, "mean": float(flat.mean()), "kept": selected}

    def selection(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The gates to prune by and how they were chosen."""
        checks = int(self.checks)
        if float(self.best_acc) >= 0:
            flat = self.best
            info = {"source": "best validation check", "check": int(self.best_check), "val_acc": float(self.best_acc)}
        else:
            flat = self.flat().detach()
            why = "no validation check reached the method" if checks == 0 else "no check had density <= r"
            info = {"source": f"final gates ({why})", "check": None, "val_acc": None}
        info.update({"checks": checks, "density": float((flat != 0).float().mean()), "mean": float(flat.mean())})
        return self.by_group(flat), info


class PruningFromScratch(PruningMethod):
    """Pruning from Scratch: learn channel gates on a frozen random backbone, then threshold them.

    `expansion` widens the random backbone the gates are learned on; budgets stay relative to the
    dense backbone. `ratio` is r, the fraction of dense FLOPs to keep (the presets tie it to
    `budget.flops`). `gamma`, `lr` and `epochs` set the search (Adam at a constant rate). `init_from`
    starts the search from the weights in a checkpoint of the expanded backbone instead of a random
    initialisation (e.g. a dense run with `backbone.width` times `expansion`). `prune_coupled` false
    leaves channel groups shared by residual additions ungated and unpruned, as the official code
    gates only the inner channels of residual blocks. `val_check_interval` (e.g. 0.2) validates the
    gates several times per search epoch, as the paper does in its one ImageNet epoch.
    """

    def __init__(
        self,
        expansion: float = 1.25,
        ratio: float | None = None,
        gamma: float = 0.5,
        lr: float = 0.01,
        epochs: int = 10,
        init_from: str | None = None,
        prune_coupled: bool = True,
        val_check_interval: float | int | None = None,
    ) -> None:
        if ratio is None or not 0.0 < float(ratio) <= 1.0:
            raise ConfigError(
                f"pfs: the target ratio r (method.ratio, which follows budget.flops) must be in (0, 1]; got {ratio}. "
                "Set budget.flops, the fraction of the dense FLOPs to keep, e.g. budget.flops=0.5"
            )
        if expansion <= 0:
            raise ConfigError(f"pfs: method.expansion must be positive; got {expansion}")
        self.expansion = float(expansion)
        self.ratio = float(ratio)
        self.gamma = float(gamma)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.init_from = init_from
        self.prune_coupled = bool(prune_coupled)
        self.val_check_interval = val_check_interval
        self.history: list[dict[str, float]] = []
        self._gates: ChannelGates | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._folded: list[nn.Module] = []
        self._grad_flags: dict[str, bool] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._selected: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    def stages(self) -> list[Stage]:
        # The search has its own schedule: Adam at a constant learning rate, whatever the retraining uses.
        optimizer = OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": self.lr})
        scheduler = OmegaConf.create({"_target_": "prunelab.lit.constant", "_partial_": True})
        # ImageNet searches one epoch and validates several times inside it (val_check_interval < 1).
        options = {"trainer": {"val_check_interval": self.val_check_interval}} if self.val_check_interval else {}
        search = Stage(SEARCH, "fit", epochs=self.epochs, optimizer=optimizer, scheduler=scheduler, options=options)
        return [search, Stage("prune", "prune")]

    def initial_model(self, model: nn.Module) -> nn.Module:
        """A freshly initialised copy of the backbone, `expansion` times as wide (or loaded from `init_from`)."""
        if model_record(model).spec is None:
            raise ConfigError(
                "pfs starts from a fresh copy of a prunelab backbone made `expansion` times as wide; a model given "
                "from Python has no backbone spec to rebuild (use prunelab.backbones.create, or another method)"
            )
        spec = dict(model_record(model).spec)
        if TARGET in spec and "width" not in parameters(locate(spec[TARGET], "backbone._target_")):
            raise ConfigError(
                f"pfs starts from a copy of the backbone made `expansion` times as wide: {spec[TARGET]} must take a "
                "`width` argument (a channel multiplier) for that"
            )
        spec["width"] = float(spec.get("width", 1.0)) * self.expansion
        start = rebuild(spec)
        if self.init_from:
            try:
                load_pretrained(start, str(self.init_from))
            except ValueError as err:
                raise ValueError(
                    f"pfs: init_from={self.init_from} must hold weights of the expanded backbone "
                    f"({spec.get('name', spec.get(TARGET))} at width {spec['width']:g}), e.g. the model.pt of a dense "
                    f"run with backbone.width={spec['width']:g}\n{err}"
                ) from err
        return start

    def gated_groups(self, model: nn.Module) -> list[tuple[ChannelGroup, list[str]]]:
        """The channel groups that get a gate, each with the modules whose outputs the gate multiplies."""
        input_shape = tuple(model_record(model).input_shape)
        groups = [g for g in channel_groups(model, input_shape) if self.prune_coupled or not g.coupled]
        feeders = _bn_feeders(model, input_shape)
        gated = []
        for group in groups:
            points = _gate_points(model, group, feeders)
            if points:
                gated.append((group, points))
        if not gated:
            raise ValueError("pfs: the model has no prunable channel group to gate")
        return gated

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        if stage.name != SEARCH:
            return model
        gated = self.gated_groups(model)
        # The search must leave the model as it found it: weights are frozen, and the BatchNorm running
        # statistics, which move in training mode as in the official code, are put back in teardown.
        self._buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
        self._grad_flags = freeze(model)
        param = next(model.parameters())
        gates = ChannelGates({group.name: group.size for group, _ in gated}).to(param.device)
        self._hooks, self._folded = [], []
        for index, (_, points) in enumerate(gated):
            for point in points:
                module = model.get_submodule(point)
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                    # gate * (gamma * x_hat + beta) = (gate * gamma) * x_hat + gate * beta: the gate goes into the
                    # affine, so no activation-sized product runs forward or backward.
                    for tensor in ("weight", "bias"):
                        parametrize.register_parametrization(module, tensor, _GateScale(gates, index))
                    self._folded.append(module)
                else:
                    self._hooks.append(module.register_forward_hook(_multiply_by_gate(gates, index)))
        self._gates = gates
        self.history = []
        return model

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        if stage.name != SEARCH or self._gates is None:
            return model
        self._selected = self._gates.selection()
        _log_selection(self._selected[1])
        for hook in self._hooks:
            hook.remove()
        for module in self._folded:
            for tensor in ("weight", "bias"):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
        unfreeze(model, self._grad_flags)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(self._buffers[name])
        self._gates, self._hooks, self._folded, self._grad_flags, self._buffers = None, [], [], {}, {}
        return model

    def state_module(self) -> nn.Module | None:
        """The gates, while a search runs."""
        return self._gates

    def state_dict(self) -> dict[str, Any]:
        """The validation record of the search and, once it is over, the gates it selected."""
        gates, info = self._selected if self._selected is not None else (None, None)
        return {"history": list(self.history), "selected": gates, "selection": info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        if state.get("selected") is not None:
            self._selected = (dict(state["selected"]), dict(state["selection"]))

    def parameters_to_train(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return list(self._gates.parameters()) if self._gates is not None else model.parameters()

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self._gates is None:
            return None
        flat = self._gates.flat()
        return self.gamma * (flat.abs().sum() / flat.numel() - self.ratio) ** 2

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self._gates is not None:
            with torch.no_grad():
                for gate in self._gates.gates:
                    gate.clamp_(0.0, 1.0)

    def on_validation_end(self, model: nn.Module, metrics: dict[str, float]) -> None:
        """Keep the gates of this validation check if they are the best admissible ones so far."""
        acc = metrics.get(f"{SEARCH}/val/acc")
        if self._gates is None or acc is None:
            return
        self.history.append(self._gates.record(float(acc), self.ratio))

    def plan(self, model: nn.Module, ctx: MethodContext):
        if self._selected is None:
            raise RuntimeError("pfs: no gates to prune by: the search stage has not run (or left no selection)")
        gates, info = self._selected
        scores = rank_scores(gates, seed=ctx.seed)
        plan = structured_plan(model, scores, ctx)
        summary = {
            "selection": info,
            "ratio": self.ratio,
            "history": self.history,
            "kept": plan.kept(),
            "sizes": plan.sizes,
            "gates": {name: [round(float(v), 6) for v in g] for name, g in gates.items()},
        }
        write_json(Path(ctx.run_dir) / "pfs_gates.json", summary, indent=1)
        return plan


def rank_scores(gates: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Each channel's rank among all gates (largest = 1, smallest = 1/N), ties broken at random by `seed`.

    A global threshold tau on these scores keeps the channels of the largest (1 - tau) * N gates, which is
    the search of the official code (binary search on the fraction of channels pruned, top-k on the
    gates). It is a threshold on the gate values too, except that it can also split a tie: after the
    clamp to [0, 1] many gates are exactly zero, and a budget may need some of them.
    """
    names = list(gates)
    flat = torch.cat([gates[n].detach().float().cpu().flatten() for n in names])
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(flat.numel(), generator=generator)
    order = shuffled[torch.argsort(flat[shuffled], stable=True)]
    ranks = torch.empty(flat.numel())
    ranks[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float)
    return dict(zip(names, torch.split(ranks / flat.numel(), [gates[n].numel() for n in names])))


class _GateScale(nn.Module):
    """Parametrization of a BatchNorm's weight or bias: multiplied by one group's gate."""

    def __init__(self, gates: ChannelGates, index: int) -> None:
        super().__init__()
        self.gates = [gates]  # a list: the gates stay the method's module, not parameters of the model
        self.index = index

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.gates[0].gates[self.index]


def _multiply_by_gate(gates: ChannelGates, index: int) -> Callable[..., torch.Tensor]:
    """A forward hook that scales each output channel by its gate."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        gate = gates.gates[index]
        return output * gate.view(1, -1, *([1] * (output.dim() - 2)))

    return hook


def _bn_feeders(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str | None]:
    """For each BatchNorm, the conv/linear layer that ran last before it in a forward pass (its input's producer)."""
    names = {module: name for name, module in model.named_modules()}
    order: list[nn.Module] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda module, *_: order.append(module)) for m in leaves]
    param = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    feeders: dict[str, str | None] = {}
    last = None
    for module in order:
        if isinstance(module, PRUNABLE_TYPES):
            last = names[module]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            feeders[names[module]] = last
    return feeders


def _gate_points(model: nn.Module, group: ChannelGroup, feeders: dict[str, str | None]) -> list[str]:
    """Where a group's gate acts: after the BatchNorm of each layer producing the channels.

    A producing layer without a BatchNorm is gated at its own output. A depthwise convolution in the
    group only passes on channels that already carry the gate, so neither it nor its BatchNorm gets
    the gate again (in MobileNets, as in the official code, the gate follows the pointwise layer).
    """
    points = []
    for layer in group.layers:
        module = model.get_submodule(layer)
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            continue
        norms = [bn for bn in group.norms if feeders.get(bn) == layer]
        points.extend(norms or [layer])
    return points


def _log_selection(info: dict[str, Any]) -> None:
    if info["val_acc"] is None:
        log.warning("pfs: pruning by the %s", info["source"])
    else:
        log.info("pfs: pruning by the gates of validation check %d (acc %.2f%%)", info["check"], info["val_acc"])
