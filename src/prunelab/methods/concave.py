"""Soft masks for lottery tickets: concave regularizers (Fracastoro et al., "Playing the lottery with
concave regularizers") and continuous sparsification (Savarese et al. 2020), the paper's sigmoid ablation.

Both give every prunable weight a relaxed mask m and train it together with the weights, minimising
L(m * theta) + lambda * R(m), in rounds (the paper's Algorithm 1):

    round t = 1..T:  theta <- theta_0 (or iteration k, `retrain.rewind_iteration`), m <- m_{t-1}
                     train (theta, m) with SGD                                   -> (theta_t, m_t)
                     fix m_i = 0 for good where the round's rule says so        (the "prune" stage)

after which the binary sparse network (every m_i not fixed at zero) is trained in isolation from the
rewound weights and tested. `test_pruned=true` also tests the search's own network (m * theta, the
fixed entries removed) right after each prune: a cheap per-round signal. With `evaluate: all` (the default) that is done
after every round, so each round has a test accuracy at its sparsity and the rounds report
(`python -m prunelab.report rounds`) draws concave, CS and IMP curves on the same axes (the paper's Figs. 5-9);
`evaluate: last` trains only
the final ticket (the paper's Table III counts search and final training apart).

Concave (`method=concave`): m in [0, 1], m_0 = 1/2, projected onto [0, 1] after every optimizer step;
R(m) = sum_i r(m_i) with r_1(m) = m (`regularizer: l1`, lambda 3e-6) or
r_eps(m) = log((m + eps) / eps) / log((1 + eps) / eps) (`log`, lambda 1e-6, eps 0.1) (Section V-A).
At a round's end every m_i < alpha is fixed at 0 (`selection: threshold`), or a fixed fraction of the
surviving weights with the smallest m goes (`fixed_fraction`, the paper's Fig. 8 ablation).

Continuous sparsification (`method=cs`): m = sigmoid(beta * s), s_0 = `mask_init` (0), an L1 penalty
lambda * sum_i m_i (lambda 1e-8), beta raised every epoch as beta_t = beta_T^(t / (E - 1)) over the
round's E epochs (beta_T = 200), so the last epoch trains at beta_T; at a round's end the entries with
s <= 0 are fixed at 0 and the others restart at s <- min(beta_T * s, s_0) (the official code's reset).

The mask is a parameter of its own optimizer group without weight decay; the weights keep the stage's.
Entries fixed at zero stay zero: the mask multiplies them by 0 in every forward pass, so neither they nor
their weights ever change again, and the masks only shrink across rounds.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunelab.budget import unstructured_plan
from prunelab.errors import ConfigError
from prunelab.io import atomic_write, write_json
from prunelab.methods.base import MethodContext, PruningMethod, Rounds, Stage
from prunelab.methods.imp import round_sparsities
from prunelab.structure import MaskParametrization, MaskPlan, attach_mask, detach_masks, prunable_weights

log = logging.getLogger("prunelab")


def log_regularizer(m: torch.Tensor, eps: float) -> torch.Tensor:
    """r_eps(m) = log((m + eps) / eps) / log((1 + eps) / eps), elementwise: 0 at m = 0, 1 at m = 1."""
    return torch.log1p(m / eps) / math.log1p(1.0 / eps)


def relaxed(values: torch.Tensor, alive: torch.Tensor, sigmoid: bool, beta: float, scale: float) -> torch.Tensor:
    """The relaxed mask m: the values themselves, or sigmoid(beta * values) * scale; 0 where not alive."""
    m = torch.sigmoid(beta * values) * scale if sigmoid else values
    return m * alive


class SoftMask(MaskParametrization):
    """The parametrization `weight -> weight * m` of one layer during a search.

    `values` is the trained tensor: m itself (concave), or s with m = sigmoid(beta * s) * scale (CS,
    `beta` set by the method every epoch). `alive` marks the entries not yet fixed at zero.
    """

    def __init__(self, values: torch.Tensor, alive: torch.Tensor, sigmoid: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.values = nn.Parameter(values.detach().clone().float())
        self.register_buffer("alive", alive.detach().clone().bool())
        self.sigmoid = sigmoid
        self.scale = scale
        self.beta = 1.0

    def mask(self) -> torch.Tensor:
        return relaxed(self.values, self.alive, self.sigmoid, self.beta, self.scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask().to(weight.dtype)

    def binary(self) -> torch.Tensor:
        return self.alive


class SoftMaskRounds(PruningMethod):
    """What concave regularisation and continuous sparsification share: rounds of search -> prune.

    Subclasses give the mask's start value, its regulariser, the projection after a step, and the rule
    that fixes entries at zero at a round's end.
    """

    sigmoid = False

    def __init__(self, rounds: int = 3, lam: float = 1e-6, dense_output: bool = False, evaluate: str = "all") -> None:
        name = type(self).__name__
        if int(rounds) != rounds or rounds < 1:
            raise ConfigError(f"{name}: method.rounds must be a whole number >= 1; got {rounds}")
        if not lam >= 0.0:
            raise ConfigError(f"{name}: method.lam (lambda) must be >= 0; got {lam}")
        if evaluate not in ("all", "last"):
            raise ConfigError(
                f"{name}: method.evaluate must be 'all' (train every round's ticket) or 'last'; got {evaluate!r}"
            )
        self.rounds = int(rounds)
        self.lam = float(lam)
        self.dense_output = bool(dense_output)
        self.evaluate = evaluate
        # The relaxed masks between stages (on the CPU), by weight name; `alive` = not fixed at zero.
        self.values: dict[str, torch.Tensor] = {}
        self.alive: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self._layers: dict[str, SoftMask] = {}

    # --- the subclass's part ---
    def initial_values(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def regularizer(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_(self, layer: SoftMask) -> None:
        """Called on every layer after every optimizer step."""

    def select(self, round_: int) -> dict[str, torch.Tensor]:
        """The entries kept after round `round_` (subsets of `alive`)."""
        raise NotImplementedError

    def restart(self, keep: dict[str, torch.Tensor]) -> None:
        """Set the values the next round starts from; the pruned entries' values are irrelevant."""

    # --- stages and hooks ---
    def stages(self) -> list[Stage | Rounds]:
        blocks: list[Stage | Rounds] = []
        for r in range(1, self.rounds + 1):
            block = [Stage("reset", "rewind")] if r > 1 else []
            block += [Stage("search", "fit"), Stage("prune", "prune")]
            if self.evaluate == "all" or r == self.rounds:
                block += [Stage("retrain", "retrain"), Stage("test", "test")]
            blocks.append(Rounds(block, count=1, start=r))
        return blocks

    def setup(self, model: nn.Module, stage: Stage, ctx: MethodContext) -> nn.Module:
        """Before a search: attach the relaxed mask to every prunable weight (created in round 1)."""
        if stage.name != "search":
            return model
        weights = dict(prunable_weights(model, self.dense_output))
        if not self.values:
            known = ctx.masks.masks if ctx.masks is not None else {}
            for name, weight in weights.items():
                self.alive[name] = known.get(name, torch.ones_like(weight, dtype=torch.bool)).cpu().bool()
                self.values[name] = self.initial_values(weight.detach().cpu()) * self.alive[name]
        self._layers = {}
        for name, weight in weights.items():
            layer = SoftMask(self.values[name], self.alive[name], sigmoid=self.sigmoid, scale=self.scale())
            self._layers[name] = attach_mask(model, name, layer.to(weight.device))
        return model

    def scale(self) -> float:
        return 1.0

    def parameters_to_train(self, model: nn.Module) -> Iterable[nn.Parameter] | Iterable[dict[str, Any]]:
        """During a search: the weights with the stage's settings, the masks without weight decay."""
        if not self._layers:
            return model.parameters()
        masks = [layer.values for layer in self._layers.values()]
        ids = {id(p) for p in masks}
        return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": masks, "weight_decay": 0.0}]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """lambda * R(m) over every prunable weight."""
        if not self._layers or self.lam == 0.0:
            return None
        return self.lam * sum(self.regularizer(layer.mask()).sum() for layer in self._layers.values())

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for layer in self._layers.values():
                self.project_(layer)

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """The mean mask value and the fraction of masks below 1/2 (how the search is moving)."""
        if not self._layers:
            return {}
        with torch.no_grad():
            masks = [layer.mask()[layer.alive] for layer in self._layers.values()]
            total = sum(m.numel() for m in masks)
            if not total:
                return {}
            return {
                "mask_mean": float(sum(m.sum() for m in masks) / total),
                "mask_below_half": float(sum((m < 0.5).sum() for m in masks) / total),
            }

    def teardown(self, model: nn.Module, stage: Stage) -> nn.Module:
        """After a search: keep the trained masks and fold them into the weights (theta <- m * theta).

        The model is then the network the search trained, so a test right after the prune
        (`test_pruned=true`) measures it; the next round and the tickets' training rewind the weights.
        """
        if stage.name != "search" or not self._layers:
            return model
        self.values = {name: layer.values.detach().cpu().clone() for name, layer in self._layers.items()}
        detach_masks(model, fold=True)
        self._layers = {}
        return model

    def plan(self, model: nn.Module, ctx: MethodContext) -> MaskPlan:
        """Fix the round's entries at zero for good; the binary mask of all others is the round's plan."""
        if not self.values:
            raise RuntimeError(f"{type(self).__name__}: the prune stage came before any search")
        searched = torch.cat([self._mask_values(name)[self.alive[name]] for name in self.values])
        keep = self.select(ctx.round)
        for name, kept in keep.items():
            if bool((kept & ~self.alive[name]).any()):
                raise RuntimeError(f"{type(self).__name__}: round {ctx.round} revived pruned weights of {name}")
            if not bool(kept.any()):
                log.warning("%s: round %s prunes every weight of %s", type(self).__name__, ctx.round, name)
        self.alive = {name: kept.clone() for name, kept in keep.items()}
        self.restart(keep)
        self.values = {name: self.values[name] * self.alive[name] for name in self.values}
        self._record(ctx, searched)
        return MaskPlan({name: kept.clone() for name, kept in keep.items()})

    def _mask_values(self, name: str) -> torch.Tensor:
        """The relaxed mask m of one weight as the search left it."""
        return relaxed(self.values[name], self.alive[name], self.sigmoid, self.final_beta(), self.scale())

    def final_beta(self) -> float:
        return 1.0

    def _record(self, ctx: MethodContext, searched: torch.Tensor) -> None:
        """Each round's distribution of the searched masks (the plot) and per-layer kept fractions."""
        edges = torch.linspace(0.0, max(1.0, float(searched.max())), 51)
        counts = torch.histc(searched, bins=50, min=float(edges[0]), max=float(edges[-1]))
        kept = sum(int(a.sum()) for a in self.alive.values())
        total = sum(a.numel() for a in self.alive.values())
        self.history.append(
            {
                "round": ctx.round,
                "sparsity": 1.0 - kept / total,
                "mask_mean": float(searched.mean()),
                "hist_edges": edges.tolist(),
                "hist_counts": counts.tolist(),
                "layers": {name: float(a.float().mean()) for name, a in self.alive.items()},
            }
        )
        write_json(ctx.run_dir / "soft_masks.json", self.history)
        _plot_history(self.history, ctx.run_dir / "soft_masks.png", type(self).__name__)

    def state_dict(self) -> dict[str, Any]:
        values = {name: layer.values.detach().cpu().clone() for name, layer in self._layers.items()} or self.values
        return {"values": dict(values), "alive": dict(self.alive), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {k: v.clone() for k, v in state.get("values", {}).items()}
        self.alive = {k: v.clone().bool() for k, v in state.get("alive", {}).items()}
        self.history = list(state.get("history", []))
        with torch.no_grad():
            for name, layer in self._layers.items():
                layer.values.copy_(self.values[name].to(layer.values.device))


class Concave(SoftMaskRounds):
    """Algorithm 1 of Fracastoro et al.: a projected relaxed mask in [0, 1] with an l1 or log regulariser.

    `alpha` is the threshold below which a mask entry is fixed at zero; the paper only says alpha << 1,
    our default 0.01 is documented in conf/method/concave.yaml. `selection: fixed_fraction` removes
    `prune_fraction` of the surviving weights per round by mask value instead (the paper's Fig. 8).
    """

    def __init__(
        self,
        regularizer: str = "log",
        lam: float | None = None,
        eps: float = 0.1,
        alpha: float = 0.01,
        selection: str = "threshold",
        prune_fraction: float = 0.2,
        initial: float = 0.5,
        rounds: int = 3,
        dense_output: bool = False,
        evaluate: str = "all",
    ) -> None:
        if regularizer not in ("l1", "log"):
            raise ConfigError(f"concave: method.regularizer must be 'l1' or 'log'; got {regularizer!r}")
        # Section V-A: lambda 3e-6 for r_1, 1e-6 for r_eps.
        lam = (3e-6 if regularizer == "l1" else 1e-6) if lam is None else lam
        super().__init__(rounds=rounds, lam=lam, dense_output=dense_output, evaluate=evaluate)
        if not eps > 0.0:
            raise ConfigError(f"concave: method.eps must be > 0; got {eps}")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"concave: method.alpha is a threshold on masks in [0, 1], in (0, 1); got {alpha}")
        if selection not in ("threshold", "fixed_fraction"):
            raise ConfigError(f"concave: method.selection must be 'threshold' or 'fixed_fraction'; got {selection!r}")
        if not 0.0 < initial <= 1.0:
            raise ConfigError(f"concave: method.initial (m_0) must be in (0, 1]; got {initial}")
        self.kind = regularizer
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.selection = selection
        self.initial = float(initial)
        self.targets = round_sparsities(prune_fraction, self.rounds) if selection == "fixed_fraction" else []

    def initial_values(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.full_like(weight, self.initial, dtype=torch.float32)

    def regularizer(self, m: torch.Tensor) -> torch.Tensor:
        return m if self.kind == "l1" else log_regularizer(m, self.eps)

    def project_(self, layer: SoftMask) -> None:
        layer.values.clamp_(0.0, 1.0).mul_(layer.alive)

    def select(self, round_: int) -> dict[str, torch.Tensor]:
        if self.selection == "threshold":
            return {name: self.alive[name] & (self.values[name] >= self.alpha) for name in self.values}
        # Entries fixed at zero rank below every surviving one, so they stay pruned.
        scores = {name: torch.where(self.alive[name], self.values[name], torch.tensor(-1.0)) for name in self.values}
        return unstructured_plan(scores, self.targets[round_ - 1], "global").masks


class ContinuousSparsification(SoftMaskRounds):
    """Savarese et al.'s continuous sparsification, on the same rounds and rewinding as `Concave`.

    Deviations, for one comparison on the same protocol (the concave paper's Fig. 9): the official code
    rewinds the weights only before the final ticket's training, and an entry whose s went below 0 may
    come back in a later round there; here every round rewinds and fixed entries stay fixed.
    `rescale` divides the mask by sigmoid(s_0) as the official code does, so the search starts from the
    dense network (false: the bare sigmoid(beta * s) of the papers' formulas).
    """

    sigmoid = True

    def __init__(
        self,
        lam: float = 1e-8,
        final_beta: float = 200.0,
        mask_init: float = 0.0,
        rescale: bool = True,
        rounds: int = 3,
        dense_output: bool = False,
        evaluate: str = "all",
    ) -> None:
        super().__init__(rounds=rounds, lam=lam, dense_output=dense_output, evaluate=evaluate)
        if not final_beta >= 1.0:
            raise ConfigError(f"cs: method.final_beta (beta_T) must be >= 1; got {final_beta}")
        self.beta_final = float(final_beta)
        self.mask_init = float(mask_init)
        self.rescale = bool(rescale)
        self.epochs = 1

    def scale(self) -> float:
        return 1.0 / (1.0 / (1.0 + math.exp(-self.mask_init))) if self.rescale else 1.0

    def final_beta(self) -> float:
        return self.beta_final

    def beta(self, epoch: int, epochs: int) -> float:
        """beta_t = beta_T^(t / (E - 1)) for epoch t = 0..E-1 of a round: 1 first, beta_T in the last epoch."""
        return self.beta_final ** (epoch / (epochs - 1)) if epochs > 1 else self.beta_final

    def on_train_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        for layer in self._layers.values():
            layer.beta = self.beta(epoch, epochs)

    def initial_values(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.full_like(weight, self.mask_init, dtype=torch.float32)

    def regularizer(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def select(self, round_: int) -> dict[str, torch.Tensor]:
        return {name: self.alive[name] & (self.values[name] > 0) for name in self.values}

    def restart(self, keep: dict[str, torch.Tensor]) -> None:
        self.values = {name: torch.clamp(self.beta_final * s, max=self.mask_init) for name, s in self.values.items()}


def _plot_history(history: list[dict[str, Any]], path: Any, title: str) -> None:
    """The distribution of the relaxed mask at the end of every round's search, one line per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for record in history:
        edges = record["hist_edges"]
        centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        ax.plot(
            centres,
            [max(c, 0.5) for c in record["hist_counts"]],
            label=f"round {record['round']} ({100 * record['sparsity']:.1f}% pruned after)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("mask value m at the end of the search")
    ax.set_ylabel("weights")
    ax.set_title(f"{title}: relaxed masks per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
