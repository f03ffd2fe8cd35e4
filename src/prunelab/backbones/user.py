"""A model of the user's own class, named on the command line: `backbone=custom backbone._target_=my_pkg.MyNet`.

The class is imported and called with the node's other keys as arguments; `num_classes` and
`in_channels` come from the data when its constructor takes them and the command does not set them.
The model's record keeps the `_target_` node as its spec, so `rebuild(spec)` (what `load_model`,
resuming and rewinding use) makes the same architecture without the config or the run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.backbones.registry import create, load_pretrained
from prunelab.errors import ConfigError
from prunelab.structure.groups import eval_mode
from prunelab.structure.plans import model_record
from prunelab.targets import TARGET, call, locate


def from_target(
    spec: dict[str, Any],
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | None = None,
    setting: str = "backbone",
) -> nn.Module:
    """Build `spec[_target_](**arguments)`, the data's `num_classes` / `in_channels` added where the class takes them.

    `pretrained` (a checkpoint path, as for prunelab's backbones) is not passed: its weights are loaded after
    construction, strictly.
    With `input_shape`, the model is called once on zeros of that shape and must give (batch, `num_classes`)
    outputs. Wrong arguments, a class that is not an `nn.Module` and a wrong output width are one-line
    `ConfigError`s naming the target, before any work.
    """
    node = {k: v for k, v in spec.items() if k != "pretrained"}
    # A preset's keys left in the node (`backbone._target_=...` without `backbone=custom`) say where to start.
    hint = ""
    if "name" in node:
        hint = (
            "; start from backbone=custom to leave out the keys of prunelab's presets: "
            f"backbone=custom {setting}.{TARGET}={node[TARGET]} +{setting}.<argument>=<value>"
        )
    model, arguments = call(node, setting, {"num_classes": int(num_classes), "in_channels": int(in_channels)}, hint)
    target = node[TARGET]
    pretrained = spec.get("pretrained")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{setting}.{TARGET}={target} made a {type(model).__name__}, not a torch.nn.Module")
    model_record(model).spec = {TARGET: target, **arguments}
    if pretrained:
        load_pretrained(model, str(pretrained))
    if input_shape is not None:
        _check_outputs(model, target, num_classes, tuple(input_shape), setting)
    return model


def _check_outputs(model: nn.Module, target: str, num_classes: int, input_shape: tuple[int, ...], setting: str) -> None:
    """The model must map a batch of `input_shape` inputs to (batch, `num_classes`) scores."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    with eval_mode(model), torch.no_grad():
        out = model(torch.zeros(2, *input_shape, device=device))
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        given = model_record(model).spec.get("num_classes")
        if given is None:
            fix = "give its constructor a num_classes argument, or make it give that many outputs"
        else:
            fix = f"it was given num_classes={given}"
        raise ConfigError(
            f"{setting}.{TARGET}={target} gives outputs of shape {shape} on inputs of shape (2, "
            f"{', '.join(map(str, input_shape))}), but the data has {num_classes} classes, so it must give (2, "
            f"{num_classes}) ({fix})"
        )


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """A fresh model of a saved spec: a registered backbone's (`create`) or a `_target_` class's."""
    if TARGET not in spec:
        return create(**spec)
    arguments = {k: v for k, v in spec.items() if k != TARGET}
    model = locate(spec[TARGET], f"backbone.{TARGET}")(**arguments)
    model_record(model).spec = dict(spec)
    return model
