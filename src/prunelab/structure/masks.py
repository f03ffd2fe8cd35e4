"""Weight masks that stay applied while a model trains: the one way prunelab attaches them.

A mask is a parametrization (`torch.nn.utils.parametrize`) of a layer's weight: the layer computes
with `mask(original)`, so the forward pass sees exact zeros and the masked entries of the original
tensor get zero gradient from the loss. Every kind of mask is a `MaskParametrization`: the fixed
binary `WeightMask` of unstructured plans, and the searched or relaxed masks of methods (e.g. the
score-based masks of Lottery Jackpots), which all say which entries they keep through `binary()`.
`fold_masks` makes the zeros permanent and removes the parametrizations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab.structure.plans import MaskPlan, model_record


class MaskParametrization(nn.Module):
    """Base class of every weight mask: maps the original weight to the weight the layer uses."""

    def binary(self) -> torch.Tensor:
        """The entries kept right now, as a bool tensor of the weight's shape."""
        raise NotImplementedError


class WeightMask(MaskParametrization):
    """A fixed binary mask: `weight = original * mask`."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().bool())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def binary(self) -> torch.Tensor:
        return self.mask


def _split(name: str) -> tuple[str, str]:
    module_name, _, tensor_name = name.rpartition(".")
    return module_name, tensor_name


def _masks_on(module: nn.Module, tensor_name: str) -> list[MaskParametrization]:
    if not parametrize.is_parametrized(module, tensor_name):
        return []
    return [p for p in module.parametrizations[tensor_name] if isinstance(p, MaskParametrization)]


def attached(model: nn.Module) -> dict[str, tuple[nn.Module, str, MaskParametrization]]:
    """Every masked tensor by parameter name: (module, tensor name, its mask)."""
    found = {}
    for module_name, module in model.named_modules():
        for tensor_name in list(getattr(module, "parametrizations", {}) or {}):
            for mask in _masks_on(module, tensor_name):
                found[f"{module_name}.{tensor_name}" if module_name else tensor_name] = (module, tensor_name, mask)
    return found


def has_masks(model: nn.Module) -> bool:
    """Whether any weight of the model has an attached mask."""
    return bool(attached(model))


def masks_of(model: nn.Module) -> MaskPlan:
    """The masks attached to a model right now, as a MaskPlan."""
    return MaskPlan(
        {name: mask.binary().detach().bool().cpu().clone() for name, (_, _, mask) in attached(model).items()}
    )


def stored(module: nn.Module, tensor_name: str) -> torch.Tensor:
    """The tensor a mask acts on: the original values under a parametrization, else the tensor itself."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def _target(model: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[nn.Module, str]:
    module_name, tensor_name = _split(name)
    try:
        module = model.get_submodule(module_name)
    except AttributeError as err:
        raise ValueError(f"mask for {name!r}: the model has no module {module_name!r}") from err
    current = getattr(module, tensor_name, None)
    if current is None:
        raise ValueError(f"mask for {name!r}: module {module_name!r} has no tensor {tensor_name!r}")
    if tuple(current.shape) != tuple(shape):
        raise ValueError(f"mask for {name!r} has shape {tuple(shape)}, the weight has {tuple(current.shape)}")
    return module, tensor_name


def attach_mask(model: nn.Module, name: str, mask: MaskParametrization) -> MaskParametrization:
    """Attach one mask to the tensor `name` (e.g. `layer1.0.conv1.weight`), replacing any mask it has.

    The original values are kept under a replaced mask, so masks can shrink or grow back.
    """
    module, tensor_name = _target(model, name, tuple(mask.binary().shape))
    if _masks_on(module, tensor_name):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    device = stored(module, tensor_name).device
    parametrize.register_parametrization(module, tensor_name, mask.to(device))
    return mask


def attach_masks(model: nn.Module, plan: MaskPlan) -> nn.Module:
    """Apply the plan's binary masks persistently (through training) and record the plan on the model.

    A weight that already carries a fixed mask gets the new one in place; any other mask is replaced.
    """
    for name, mask in plan.masks.items():
        module, tensor_name = _target(model, name, tuple(mask.shape))
        current = _masks_on(module, tensor_name)
        if len(current) == 1 and isinstance(current[0], WeightMask):
            current[0].mask.copy_(mask.to(current[0].mask.device))
        else:
            attach_mask(model, name, WeightMask(mask))
    model_record(model).masks = plan
    return model


def detach_masks(model: nn.Module, fold: bool = True) -> nn.Module:
    """Remove every attached mask: `fold` keeps the masked values (zeros), else the original values come back."""
    for _, (module, tensor_name, _) in attached(model).items():
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=fold)
    return model


def fold_masks(model: nn.Module) -> nn.Module:
    """Make attached masks permanent: the weights keep their zeros, the parametrizations go."""
    return detach_masks(model, fold=True)


def zero_masked_(model: nn.Module, plan: MaskPlan) -> nn.Module:
    """Zero the masked-out entries in place, once (the stored values under an attached mask too)."""
    with torch.no_grad():
        for name, mask in plan.masks.items():
            module, tensor_name = _target(model, name, tuple(mask.shape))
            tensor = stored(module, tensor_name)
            tensor.mul_(mask.to(tensor.device, tensor.dtype))
    return model
