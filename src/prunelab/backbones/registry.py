"""The backbone registry: named factories, construction by name, and checkpoint loading."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.backbones.attention import Relaid, relayout
from prunelab.structure.plans import model_record

Factory = Callable[..., nn.Module]

_REGISTRY: dict[str, Factory] = {}

# Prefixes that hand construction to an external library instead of the registry.
_TIMM_PREFIX = "timm:"
_TORCHVISION_PREFIX = "torchvision:"

# Wrappers such as DataParallel (`module.`) and LightningModules (`model.`) prefix parameter names.
_WRAPPER_PREFIXES = ("module.", "model.")


def scale_channels(channels: int, width: float) -> int:
    """Apply a width multiplier to a channel count, rounding to the nearest integer but keeping one."""
    return max(1, int(round(channels * width)))


def fan_out_init(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions and unit BatchNorm, with fans from the current shapes.

    Linear layers keep their default initialisation unless `linear_std` is given (normal weights with
    that std and zero bias) or `zero_linear_bias` is set.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a model factory under `name`; a name can be registered only once.

    The factory is called as `fn(num_classes=..., in_channels=..., width=..., **kwargs)`.
    """
    if name.startswith((_TIMM_PREFIX, _TORCHVISION_PREFIX)):
        raise ValueError(f"backbone name {name!r} uses a reserved prefix ({_TIMM_PREFIX}, {_TORCHVISION_PREFIX})")

    def decorator(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def _unknown_name_error(name: str) -> ValueError:
    return ValueError(
        f"unknown backbone {name!r}; available: {', '.join(available())}; "
        f"or any timm model as '{_TIMM_PREFIX}<model>' or torchvision model as '{_TORCHVISION_PREFIX}<model>'"
    )


def _build_timm(model_name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(model_name):
        raise _unknown_name_error(_TIMM_PREFIX + model_name)
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def _build_torchvision(model_name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision

    if model_name not in torchvision.models.list_models():
        raise _unknown_name_error(_TORCHVISION_PREFIX + model_name)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first RGB convolution for one that reads `in_channels` channels (torchvision has no option)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                replacement = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, replacement)
                return
    raise ValueError(f"cannot set in_channels={in_channels}: no 3-channel Conv2d found in {type(model).__name__}")


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    pretrained: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone by name, optionally load weights, and record how to rebuild it.

    The build arguments (not `pretrained`) are stored as the spec of the model's record
    (`model.prunelab.spec`), so that `create(**model.prunelab.spec)` gives the same architecture with a
    fresh initialisation.
    """
    if name.startswith((_TIMM_PREFIX, _TORCHVISION_PREFIX)):
        if width != 1.0:
            raise ValueError(f"{name!r}: width multipliers are only supported for registered backbones, got {width}")
        if name.startswith(_TIMM_PREFIX):
            model = _build_timm(name[len(_TIMM_PREFIX) :], num_classes, in_channels, **kwargs)
        else:
            model = _build_torchvision(name[len(_TORCHVISION_PREFIX) :], num_classes, in_channels, **kwargs)
    elif name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)
    else:
        raise _unknown_name_error(name)
    relayout(model)  # torchvision's attention in the layout whose heads prune

    model_record(model).spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "width": width,
        **kwargs,
    }
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def _extract_state_dict(checkpoint: Any, path: str) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ValueError(
        f"{path}: not a state dict, nor a dict holding one under 'state_dict' or 'model' "
        f"(found {type(checkpoint).__name__})"
    )


def _strip_wrapper_prefixes(state_dict: Mapping[str, Any], model_keys: set[str]) -> dict[str, Any]:
    """Remove `module.` / `model.` prefixes that the model's own names do not have.

    Keys without the prefix are dropped when the prefix is stripped: in a Lightning checkpoint they
    belong to other attributes of the LightningModule, not to the model.
    """
    state = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            prefixed = [k for k in state if k.startswith(prefix)]
            if prefixed and not any(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: state[k] for k in prefixed}
                changed = True
    return state


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load weights from a checkpoint file into `model`, strictly.

    Accepts a raw state dict, or a dict with the state dict under `state_dict` (reference CIFAR
    checkpoints, Lightning checkpoints) or `model`. Wrapper prefixes are stripped. Any missing,
    unexpected or wrongly shaped tensor is an error, so that a checkpoint for another architecture
    never loads half-way.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    state = _strip_wrapper_prefixes(_extract_state_dict(checkpoint, path), set(expected))
    for name, module in model.named_modules():
        if isinstance(module, Relaid):
            module.rename(state, f"{name}." if name else "")

    # Old checkpoints predate BatchNorm's `num_batches_tracked`; BatchNorm fills it in itself.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: model expects {tuple(expected[k].shape)}, checkpoint has {tuple(state[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise ValueError(
            f"cannot load {path} into {type(model).__name__} "
            "(the checkpoint may be for another architecture or width):\n" + "\n".join(problems)
        )
    model.load_state_dict(state, strict=True)
