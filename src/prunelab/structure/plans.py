"""Plans: what a pruning method decided, kept apart from the model it was decided on.

A `ChannelPlan` names, for each channel group, the channels to keep; applying it removes the others
physically. A `MaskPlan` holds one binary mask per weight tensor for unstructured pruning. Both are
plain data, so they can be saved, inspected, compared across rounds and re-applied to a fresh model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.io import save_torch, write_json
from prunelab.structure.channel_group import ChannelGroup

CHANNEL_PLAN_FORMAT = "prunelab-channel-plan-v1"
MASK_PLAN_FORMAT = "prunelab-mask-plan-v1"


@dataclass
class ChannelPlan:
    """Kept channel indices per group name, with the group sizes the plan was made for.

    Groups of the model that the plan does not name are kept whole. Indices are stored sorted; an
    empty keep list, an index outside the group or a repeated index is refused at construction.
    """

    keep: dict[str, list[int]]
    sizes: dict[str, int]

    def __post_init__(self) -> None:
        missing = [name for name in self.keep if name not in self.sizes]
        if missing:
            raise ValueError(f"ChannelPlan: no size given for group(s) {', '.join(missing)}")
        extra = [name for name in self.sizes if name not in self.keep]
        if extra:
            raise ValueError(f"ChannelPlan: no keep list given for group(s) {', '.join(extra)}")
        keep: dict[str, list[int]] = {}
        for name, indices in self.keep.items():
            size = int(self.sizes[name])
            values = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
            if not values:
                raise ValueError(f"ChannelPlan: group {name!r} keeps no channel (a group needs at least one)")
            if len(set(values)) != len(values):
                raise ValueError(f"ChannelPlan: group {name!r} lists a channel more than once")
            bad = [i for i in values if not 0 <= i < size]
            if bad:
                raise ValueError(f"ChannelPlan: group {name!r} has {size} channels, index {bad[0]} is out of range")
            keep[name] = sorted(values)
        self.keep = keep
        self.sizes = {name: int(self.sizes[name]) for name in keep}

    @classmethod
    def full(cls, groups: list[ChannelGroup]) -> ChannelPlan:
        """The plan that keeps every channel of every group (applying it changes nothing)."""
        return cls({g.name: list(range(g.size)) for g in groups}, {g.name: g.size for g in groups})

    def kept(self) -> dict[str, int]:
        """Number of channels kept in each group."""
        return {name: len(indices) for name, indices in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `summary` ("kept/size" per group) is for readers and ignored on load."""
        return {
            "format": CHANNEL_PLAN_FORMAT,
            "summary": {name: f"{len(idx)}/{self.sizes[name]}" for name, idx in self.keep.items()},
            "sizes": dict(self.sizes),
            "keep": {name: list(idx) for name, idx in self.keep.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelPlan:
        """Rebuild a plan from `to_dict` output (validated again)."""
        if data.get("format", CHANNEL_PLAN_FORMAT) != CHANNEL_PLAN_FORMAT:
            raise ValueError(f"not a channel plan (format {data.get('format')!r}, expected {CHANNEL_PLAN_FORMAT!r})")
        return cls({k: list(v) for k, v in data["keep"].items()}, dict(data["sizes"]))

    def save_json(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically)."""
        return write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load_json(cls, path: str | Path) -> ChannelPlan:
        """Read a plan written by `save_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class MaskPlan:
    """One boolean mask per weight tensor, keyed by parameter name; True keeps the entry."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, mask in self.masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"MaskPlan: the mask for {name!r} must be a bool tensor")

    def counts(self) -> dict[str, tuple[int, int]]:
        """(kept, total) entries per parameter."""
        return {name: (int(mask.sum()), mask.numel()) for name, mask in self.masks.items()}

    def sparsity(self) -> float:
        """Fraction of all masked entries that are pruned (False)."""
        counts = self.counts().values()
        total = sum(n for _, n in counts)
        return (total - sum(k for k, _ in counts)) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned entries in each masked parameter."""
        return {name: (n - k) / n if n else 0.0 for name, (k, n) in self.counts().items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (sparsity and counts per layer), not the masks themselves."""
        return {
            "format": MASK_PLAN_FORMAT,
            "sparsity": self.sparsity(),
            "layers": {
                name: {
                    "shape": list(self.masks[name].shape),
                    "kept": kept,
                    "total": total,
                    "sparsity": (total - kept) / total if total else 0.0,
                }
                for name, (kept, total) in self.counts().items()
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the masks with `torch.save` (bool tensors only, so `weights_only=True` loads them)."""
        return save_torch(
            path, {"format": MASK_PLAN_FORMAT, "masks": {k: v.detach().cpu() for k, v in self.masks.items()}}
        )

    @classmethod
    def load(cls, path: str | Path) -> MaskPlan:
        """Read masks written by `save`."""
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != MASK_PLAN_FORMAT:
            raise ValueError(f"{path} is not a prunelab mask plan (expected format {MASK_PLAN_FORMAT!r})")
        return cls(dict(payload["masks"]))


@dataclass
class ModelRecord:
    """What prunelab knows about a model beyond its modules, kept as `model.prunelab`.

    `spec` is how `prunelab.backbones.create` rebuilds the architecture; `input_shape` the (C, H, W)
    the model is traced and measured at; `plans` the channel plans applied to it, in order (replayed
    on a fresh model to rebuild a pruned one); `masks` its unstructured masks, or None; `skip` the
    layers (`structure.skip` patterns) whose channels are kept whole; `prune_embedding` whether a
    transformer's embedding width may be pruned (`structure.prune_embedding`); `prune_head_dim` whether
    attention heads lose dimensions instead of whole heads (`structure.prune_head_dim`). `save_model`
    writes the spec, plans, input shape and masks, and `load_model` restores them (replaying a plan
    needs neither setting).
    """

    spec: dict[str, Any] | None = None
    input_shape: tuple[int, ...] | None = None
    plans: list[ChannelPlan] = field(default_factory=list)
    masks: MaskPlan | None = None
    skip: tuple[str, ...] = ()
    prune_embedding: bool = False
    prune_head_dim: bool = False


def model_record(model: nn.Module) -> ModelRecord:
    """The model's record, created empty the first time it is asked for."""
    found = model.__dict__.get("prunelab")
    if found is None:
        found = ModelRecord()
        model.__dict__["prunelab"] = found
    return found
