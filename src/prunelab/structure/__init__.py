"""Structure of a model for pruning: channel groups, plans, channel surgery and persistent masks."""

from prunelab.structure.groups import ChannelGroup, channel_groups, group_weights, root_weights
from prunelab.structure.masks import attach_masks, fold_masks, has_masks, masks_of, zero_masked_
from prunelab.structure.plans import ChannelPlan, MaskPlan
from prunelab.structure.surgery import apply_channel_plan, reinitialize

__all__ = [
    "ChannelGroup",
    "ChannelPlan",
    "MaskPlan",
    "apply_channel_plan",
    "attach_masks",
    "channel_groups",
    "fold_masks",
    "group_weights",
    "has_masks",
    "masks_of",
    "reinitialize",
    "root_weights",
    "zero_masked_",
]
