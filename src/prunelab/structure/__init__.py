"""Structure of a model for pruning: channel groups, plans, channel surgery and weight masks."""

from prunelab.errors import UnprunableError
from prunelab.structure.channel_group import ChannelGroup, group_weights, root_weights
from prunelab.structure.coupled import CoupledSlice, coupled_slices, slice_of
from prunelab.structure.groups import channel_groups, remember_groups
from prunelab.structure.layers import PRUNABLE_TYPES, eval_mode, freeze, prunable_weights, unfreeze
from prunelab.structure.masks import (
    MaskParametrization,
    WeightMask,
    attach_mask,
    attach_masks,
    detach_masks,
    fold_masks,
    has_masks,
    masks_of,
    zero_masked_,
)
from prunelab.structure.plans import ChannelPlan, MaskPlan, ModelRecord, model_record
from prunelab.structure.surgery import apply_channel_plan, check_prunable, reinitialize

__all__ = [
    "PRUNABLE_TYPES",
    "ChannelGroup",
    "ChannelPlan",
    "CoupledSlice",
    "MaskParametrization",
    "MaskPlan",
    "ModelRecord",
    "UnprunableError",
    "WeightMask",
    "apply_channel_plan",
    "attach_mask",
    "attach_masks",
    "channel_groups",
    "check_prunable",
    "coupled_slices",
    "detach_masks",
    "eval_mode",
    "fold_masks",
    "freeze",
    "group_weights",
    "has_masks",
    "masks_of",
    "model_record",
    "prunable_weights",
    "reinitialize",
    "remember_groups",
    "root_weights",
    "slice_of",
    "unfreeze",
    "zero_masked_",
]
