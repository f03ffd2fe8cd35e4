"""Saving a model so that it reloads without the config or the run that made it.

A pruned model is rebuilt rather than unpickled: the file holds the architecture spec, the channel
plans that were applied to it (replayed in order on a fresh model), the weights, and the unstructured
masks if it has any. Everything is tensors and plain values, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "prunelab-model-v1"


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with attached masks folded in: `weight` holds exact zeros, no `_orig`/`_mask`."""
    from prunelab.structure.masks import _masked_tensors

    state = model.state_dict()
    for name, _, tensor_name in _masked_tensors(model):
        prefix = name[: -len(tensor_name)]
        orig = state.pop(f"{prefix}{tensor_name}_orig")
        mask = state.pop(f"{prefix}{tensor_name}_mask")
        state[name] = orig * mask
    return state


def _mask_tensors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    from prunelab.structure.masks import has_masks, masks_of

    plan = getattr(model, "prunelab_masks", None)
    if plan is None and has_masks(model):
        plan = masks_of(model)
    if plan is None:
        return None
    return {name: mask.detach().cpu() for name, mask in plan.masks.items()}


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write everything needed to rebuild a model built by `prunelab.backbones.create`.

    That is the spec, the applied channel plans (`model.prunelab_plans`) with the input shape they
    were traced at (`model.prunelab_input_shape`, required with plans), the weights with any attached
    masks folded in, and the masks themselves (`model.prunelab_masks`). The file is written to a
    temporary name and renamed, so a killed run never leaves a half-written model.
    """
    spec = getattr(model, "prunelab_spec", None)
    if spec is None:
        raise ValueError("save_model needs a model built by prunelab.backbones.create (it has no prunelab_spec)")
    plans = list(getattr(model, "prunelab_plans", []))
    input_shape = getattr(model, "prunelab_input_shape", None)
    if plans and input_shape is None:
        raise ValueError(
            "save_model: the model has channel plans but no prunelab_input_shape; set it to the (C, H, W) "
            "the plans were applied at, so that load_model can replay them"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "spec": dict(spec),
        "state_dict": _plain_state_dict(model),
        "plans": [plan.to_dict() for plan in plans],
        "masks": _mask_tensors(model),
        "input_shape": list(input_shape) if input_shape is not None else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from its file alone: architecture, channel plans, weights, masks.

    Masks come back as `model.prunelab_masks` (a MaskPlan) but are not attached; the weights already
    hold their zeros. Attach them with `prunelab.structure.attach_masks` to keep training sparse.
    """
    from prunelab.backbones import create
    from prunelab.structure import ChannelPlan, MaskPlan, apply_channel_plan

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path.resolve()}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a prunelab model file (expected format '{FORMAT}')")
    model = create(**payload["spec"])
    input_shape = payload.get("input_shape")
    if input_shape is not None:
        model.prunelab_input_shape = tuple(int(n) for n in input_shape)
    for plan_dict in payload.get("plans") or []:
        apply_channel_plan(model, ChannelPlan.from_dict(plan_dict), model.prunelab_input_shape)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit the architecture {payload['spec']}: {err}") from err
    masks = payload.get("masks")
    if masks is not None:
        model.prunelab_masks = MaskPlan(dict(masks))
    return model


def export_deployable(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int]) -> Path:
    """Write a TorchScript file of the model (eval mode, masks folded) that runs without prunelab.

    The model is traced on a copy, so the model passed in keeps its mode, masks and hooks.
    """
    from prunelab.structure.masks import fold_masks

    deployable = fold_masks(copy.deepcopy(model)).eval()
    param = next(deployable.parameters())
    example = torch.randn(1, *input_shape, device=param.device, dtype=param.dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # TorchScript is deprecated in favour of torch.export, but it is still the format that loads with
    # torch alone and runs any batch size; its deprecation warnings are expected here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = torch.jit.trace(deployable, example)
        torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)
    return path
