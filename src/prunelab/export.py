"""Saving a model so that it reloads without the config or the run that made it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "prunelab-model-v1"


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write the architecture spec and weights of a model built by `prunelab.backbones.create`.

    The file holds only tensors and plain values, so it loads with `torch.load(weights_only=True)`.
    It is written to a temporary name and renamed, so a killed run never leaves a half-written model.
    """
    spec = getattr(model, "prunelab_spec", None)
    if spec is None:
        raise ValueError("save_model needs a model built by prunelab.backbones.create (it has no prunelab_spec)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "spec": dict(spec), "state_dict": model.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model (architecture and weights) from its file alone."""
    from prunelab.backbones import create

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path.resolve()}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prunelab model file (expected format '{FORMAT}')")
    model = create(**payload["spec"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit the architecture {payload['spec']}: {err}") from err
    return model
