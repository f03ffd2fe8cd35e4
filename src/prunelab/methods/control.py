"""Controls for a finished pruning run (issue 35): its structure with other channels or weights, or with its own.

`method=control method.source=<run directory> method.pick=random|same` prunes the dense backbone once to the
source run's final structure, read from its `model.pt` (every channel plan it applied, composed, so a method
that pruned over several rounds counts by what it kept in the end; or its final masks):

- a structured source: every channel group keeps exactly as many channels as in the source's final model;
  `pick=random` draws which ones from the run's seed, `pick=same` keeps the source's own channels;
- an unstructured source: every masked layer keeps exactly as many weights as the source's final mask;
  `pick=random` draws a mask per layer from the run's seed, `pick=same` takes the source's mask.

The run's `retrain` decides the rest: with `retrain=finetune` (the default) the random pick is the "random
channels (or weights), same per-layer widths (or sparsities)" control; `retrain=scratch` gives Scratch-E (and,
with `pick=same` on an unstructured source, the lottery-ticket control: the same mask, weights re-initialised),
`retrain=scratch_b` Scratch-B (Liu et al. 2019). `budget.*` is ignored: the budget is the source's structure.
The source must be a finished run (a `summary.json`) of the same backbone and dataset as this run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from prunelab.errors import ConfigError
from prunelab.export import load_model
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.structure import ChannelPlan, MaskPlan, channel_groups, model_record, prunable_weights

PICKS = ("random", "same")
# Dataset settings that say where the data is and how it is loaded, not what is learned from it, or (the split's
# seed, which follows the run's `seed`) which images a run holds out: a control may differ from its source there.
LOADING = ("root", "download", "num_workers", "batch_size", "seed")


class Control(PruningMethod):
    """Prune to a finished run's final structure, with random channels or weights or the source's own."""

    def __init__(self, source: str | None = None, pick: str = "random", backbone: Any = None, dataset: Any = None):
        if pick not in PICKS:
            raise ConfigError(f"method.pick={pick!r} must be one of {', '.join(PICKS)}")
        if not source:
            raise ConfigError("method=control needs method.source=<the directory of a finished prunelab run>")
        self.source, self.pick = Path(str(source)).resolve(), pick
        if not self.source.is_dir():
            raise ConfigError(f"method.source={source}: no such directory")
        if not (self.source / "summary.json").is_file() or not (self.source / "model.pt").is_file():
            raise ConfigError(f"method.source={source} holds no finished run (no summary.json and model.pt)")
        summary = json.loads((self.source / "summary.json").read_text())
        if summary.get("model/flops_ratio", 1.0) >= 1.0 and not summary.get("model/sparsity", 0.0):
            raise ConfigError(f"method.source={source} pruned nothing (model/flops_ratio 1, model/sparsity 0)")
        held = OmegaConf.to_container(OmegaConf.load(self.source / "config.yaml"))
        if not isinstance(held, dict):
            raise ConfigError(f"method.source={source}: its config.yaml holds no run's config")
        for section, ours in (("backbone", backbone), ("dataset", dataset)):
            differ = _differences(_plain(held.get(section)), _plain(ours), LOADING if section == "dataset" else ())
            if differ:
                key, theirs, mine = differ[0]
                raise ConfigError(
                    f"method.source={source} was run with {section}.{key}={theirs}, this run has {mine}: a control "
                    f"runs on its source's {section}"
                )

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext) -> ChannelPlan | MaskPlan:
        # A source of the user's own class (no backbone spec) is rebuilt on this run's dense model.
        source = load_model(self.source / "model.pt", base=model)
        record = model_record(source)
        if record.plans and record.masks is not None:
            raise ValueError(f"control: {self.source} both removed channels and masked weights; pick one of the two")
        generator = torch.Generator().manual_seed(ctx.seed)
        if record.masks is not None:
            return self._masks(model, record.masks, generator)
        if record.plans:
            return self._channels(model, source, record.plans, ctx, generator)
        raise ValueError(f"control: {self.source}'s final model is not pruned (no channel plan, no mask)")

    def _channels(
        self, model: nn.Module, source: nn.Module, plans: list[ChannelPlan], ctx: MethodContext, generator
    ) -> ChannelPlan:
        """Every group of `model` keeps as many channels as the source's final model (its own, or random ones)."""
        kept = final_keep(plans)
        # The composed plans must give the widths the source's final model has (groups named as before pruning).
        final = {g.name: g.size for g in channel_groups(source, ctx.input_shape)}
        wrong = [name for name, indices in kept.items() if name in final and final[name] != len(indices)]
        if wrong:
            raise ValueError(f"control: the plans of {self.source} do not give its final width for group {wrong[0]}")
        groups = channel_groups(model, ctx.input_shape)
        before: dict[str, int] = {}
        for plan in plans:
            for name, size in plan.sizes.items():
                before.setdefault(name, size)
        # A group the source pruned must be one this run may prune (e.g. not kept whole by structure.skip).
        here = {g.name for g in groups}
        missing = [name for name, indices in kept.items() if len(indices) < before[name] and name not in here]
        if missing:
            raise ValueError(f"control: {self.source} pruned group {missing[0]}, which this run keeps whole")
        keep, sizes = {}, {}
        for group in groups:
            indices = kept.get(group.name, list(range(group.size)))
            # A source that started from another width (pfs's wider network) gives widths, not channels of this model.
            wider = before.get(group.name, group.size) != group.size
            if len(indices) > group.size or (wider and self.pick == "same"):
                raise ValueError(
                    f"control: the source pruned group {group.name} from {before[group.name]} channels to "
                    f"{len(indices)}, this run's model has {group.size}"
                )
            if self.pick == "random":
                indices = torch.randperm(group.size, generator=generator)[: len(indices)].tolist()
            keep[group.name], sizes[group.name] = indices, group.size
        return ChannelPlan(keep, sizes)

    def _masks(self, model: nn.Module, masks: MaskPlan, generator) -> MaskPlan:
        """The source's mask, or per layer a random one with as many zeros."""
        weights = dict(prunable_weights(model))
        out = {}
        for name, mask in masks.masks.items():
            if name not in weights or weights[name].shape != mask.shape:
                raise ValueError(f"control: the source's mask {name} {tuple(mask.shape)} fits no weight of this model")
            if self.pick == "same":
                out[name] = mask.clone()
                continue
            chosen = torch.zeros(mask.numel(), dtype=torch.bool)
            chosen[torch.randperm(mask.numel(), generator=generator)[: int(mask.sum())]] = True
            out[name] = chosen.view(mask.shape)
        return MaskPlan(out)


def final_keep(plans: list[ChannelPlan]) -> dict[str, list[int]]:
    """The channels of the unpruned model that plans applied in order keep, per group (each plan's indices count
    within the group as the plans before it left it)."""
    keep: dict[str, list[int]] = {}
    for plan in plans:
        for name, indices in plan.keep.items():
            before = keep.get(name, list(range(plan.sizes[name])))
            if len(before) != plan.sizes[name]:
                raise ValueError(
                    f"control: group {name} had {len(before)} channels, a later plan says {plan.sizes[name]}"
                )
            keep[name] = [before[i] for i in indices]
    return keep


def _plain(node: Any) -> dict[str, Any]:
    """A config section as flat `a.b` keys of JSON values (resolved), {} for none."""
    if node is None:
        return {}
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = value

    walk(data, "")
    return json.loads(json.dumps(flat, default=str))


def _differences(held: dict[str, Any], ours: dict[str, Any], ignored: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, source's value, this run's value) for each key on which two flat sections differ, but `ignored`."""
    keys = [k for k in dict.fromkeys([*held, *ours]) if k.split(".")[0] not in ignored]
    return [
        (k, held.get(k, "absent"), ours.get(k, "absent"))
        for k in keys
        if held.get(k, "absent") != ours.get(k, "absent")
    ]
