"""Unstructured masks that stay applied while a model trains, built on `torch.nn.utils.prune`.

`attach_masks` reparametrises each masked weight as `weight = weight_orig * weight_mask`: the
forward pass sees exact zeros and the masked entries of `weight_orig` get zero gradient from the loss.
`fold_masks` makes the zeros permanent and removes the hooks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from prunelab.structure.plans import MaskPlan


def _split(name: str) -> tuple[str, str]:
    module_name, _, tensor_name = name.rpartition(".")
    return module_name, tensor_name


def _pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def _masked_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(parameter name, module, tensor name) of every tensor with an attached mask."""
    found = []
    for module_name, module in model.named_modules():
        for hook in _pruning_hooks(module):
            name = hook._tensor_name
            found.append((f"{module_name}.{name}" if module_name else name, module, name))
    return found


def has_masks(model: nn.Module) -> bool:
    """Whether any weight of the model has an attached mask."""
    return bool(_masked_tensors(model))


def masks_of(model: nn.Module) -> MaskPlan:
    """The masks attached to a model right now, as a MaskPlan."""
    return MaskPlan({name: getattr(m, f"{t}_mask").detach().bool().clone() for name, m, t in _masked_tensors(model)})


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


def attach_masks(model: nn.Module, plan: MaskPlan) -> nn.Module:
    """Apply the plan's masks persistently (through training) and record it as `model.prunelab_masks`.

    A weight that already carries a mask gets the new mask in place of the old one, and its
    underlying `weight_orig` values are kept, so masks can both shrink and grow back (score-based
    methods swap entries on frozen weights).
    """
    for name, mask in plan.masks.items():
        module, tensor_name = _target(model, name, tuple(mask.shape))
        hooks = [h for h in _pruning_hooks(module) if h._tensor_name == tensor_name]
        if hooks:
            buffer = getattr(module, f"{tensor_name}_mask")
            buffer.copy_(mask.to(buffer.device))
            setattr(module, tensor_name, hooks[0].apply_mask(module))
        else:
            prune.custom_from_mask(module, tensor_name, mask.to(getattr(module, tensor_name).device))
    model.prunelab_masks = plan
    return model


def fold_masks(model: nn.Module) -> nn.Module:
    """Make attached masks permanent: the weights keep their zeros, the hooks and buffers go."""
    for _, module, tensor_name in _masked_tensors(model):
        prune.remove(module, tensor_name)
    return model


def zero_masked_(model: nn.Module, plan: MaskPlan) -> nn.Module:
    """Zero the masked-out entries in place, once, without attaching anything."""
    with torch.no_grad():
        for name, mask in plan.masks.items():
            module, tensor_name = _target(model, name, tuple(mask.shape))
            # With a mask attached, the stored values live in `<name>_orig`.
            tensor = getattr(module, f"{tensor_name}_orig", None)
            if tensor is None:
                tensor = getattr(module, tensor_name)
            tensor.mul_(mask.to(tensor.device, tensor.dtype))
            if tensor is not getattr(module, tensor_name):
                getattr(module, tensor_name).mul_(mask.to(tensor.device, tensor.dtype))
    return model
