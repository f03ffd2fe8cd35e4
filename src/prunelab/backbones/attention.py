"""torchvision's attention modules rebuilt in the layout whose heads prunelab prunes.

timm's attention keeps `qkv` and `proj` Linear layers, `num_heads`, `head_dim` and `scale`, and computes
with them, so losing heads or head dimensions only means updating those. torchvision's attention
modules derive the head width from the embedding instead (`nn.MultiheadAttention` needs the two equal,
Swin's functional `shifted_window_attention` splits the embedding width into heads, MaxViT reshapes
the heads' output to the embedding), so a pruned head count cannot run. `relayout` replaces them, at
creation, by modules of the same computation in timm's layout:

- ViT's `nn.MultiheadAttention` -> `SelfAttention`
- Swin's `ShiftedWindowAttention` / `ShiftedWindowAttentionV2` -> `WindowSelfAttention`
- MaxViT's `RelativePositionalMultiHeadAttention` -> `PartitionAttention`

Each gives the stock module's outputs for the stock weights and loads state dicts written for it
(`Relaid.RENAMED` maps torchvision's tensor names to its own).

timm's attention modules that derive their head width from the embedding get a `HeadWidth` forward
(`backbones.timm_attention`); torchvision's are replaced by `Relaid` modules (`backbones.torchvision_attention`).
"""

from __future__ import annotations

import logging

from torch import nn

from prunelab.backbones.timm_attention import (
    ChannelGroupAttention,
    CosineWindowAttention,
    CrossCovarianceAttention,
    DimensionMajorAttention,
    GatedPositionalAttention,
    GlobalQueryAttention,
    GroupedWindowAttention,
    LambdaWidth,
    LinearAttention,
    MapAttention,
    MaskUnitAttention,
    OutlookAttention,
    PartialSingleHeadAttention,
    PoolingAttention,
    QueryKeyValueAttention,
    QueryKeyValueLayout,
    QueryTokenAttention,
    RadixSplitAttention,
    RelativePositionAttention,
    SeparateProjectionAttention,
    StackedAttention,
    SubsampledAttention,
    TalkingHeadsAttention,
)
from prunelab.backbones.torchvision_attention import PartitionAttention, Relaid, SelfAttention, WindowSelfAttention

__all__ = ["PartitionAttention", "Relaid", "SelfAttention", "WindowSelfAttention", "relayout"]


_TIMM = {
    "timm.models.cait.ClassAttn": (QueryTokenAttention, {}),
    "timm.models.cait.TalkingHeadAttn": (TalkingHeadsAttention, {}),
    "timm.models.crossvit.CrossAttention": (QueryTokenAttention, {"writers": ("wq", "wk", "wv")}),
    "timm.models.twins.GlobalSubSampleAttn": (SubsampledAttention, {}),
    "timm.models.twins.LocallyGroupedAttn": (GroupedWindowAttention, {}),
    "timm.models.pvt_v2.Attention": (SubsampledAttention, {}),
    "timm.models.convit.MHSA": (StackedAttention, {}),
    "timm.models.volo.Attention": (StackedAttention, {}),
    "timm.models.davit.WindowAttention": (StackedAttention, {}),
    "timm.models.metaformer.Attention": (StackedAttention, {}),
    "timm.models.davit.ChannelAttention": (ChannelGroupAttention, {}),
    "timm.models.volo.OutlookAttention": (OutlookAttention, {}),
    "timm.models.volo.ClassAttention": (QueryKeyValueLayout, {}),
    "timm.models.convit.GPSA": (GatedPositionalAttention, {}),
    "timm.models.edgenext.CrossCovarianceAttn": (CrossCovarianceAttention, {}),
    "timm.models.xcit.XCA": (CrossCovarianceAttention, {}),
    "timm.models.tnt.Attention": (QueryKeyValueAttention, {}),
    "timm.models.vision_transformer_relpos.RelPosAttention": (RelativePositionAttention, {}),
    "timm.models.mobilevit.LinearSelfAttention": (LinearAttention, {}),
    "timm.models.fastvit.Attention": (MapAttention, {}),
    "timm.models.nextvit.EfficientAttention": (SeparateProjectionAttention, {}),
    "timm.models.hiera.MaskUnitAttention": (MaskUnitAttention, {}),
    "timm.models.nest.Attention": (DimensionMajorAttention, {}),
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": (CosineWindowAttention, {}),
    "timm.models.gcvit.WindowAttentionGlobal": (GlobalQueryAttention, {}),
    "timm.models.mvitv2.MultiScaleAttention": (PoolingAttention, {}),
    "timm.layers.lambda_layer.LambdaLayer": (LambdaWidth, {}),
    "timm.models.shvit.SHSA": (PartialSingleHeadAttention, {}),
    "timm.layers.split_attn.SplitAttn": (RadixSplitAttention, {}),
}
_REBUILT: dict[type, type] = {}


_CASCADED = "timm.models.efficientvit_msra.CascadedGroupAttention"


def _rebuild_timm(module: nn.Module) -> None:
    """Give a timm attention listed in `_TIMM` its `HeadWidth` class and head width, in place."""
    cls = type(module)
    mixin, attributes = _TIMM[f"{cls.__module__}.{cls.__name__}"]
    if cls not in _REBUILT:
        _REBUILT[cls] = type(cls.__name__, (mixin, cls), {"__module__": __name__, **attributes})
    module.__class__ = _REBUILT[cls]
    module.rebuilt()


def relayout(model: nn.Module) -> None:
    """Replace torchvision's attention modules in `model` by their `Relaid` equivalents, and give timm's that derive
    their head width from the embedding a `HeadWidth` forward (`_TIMM`), in place."""
    for module in list(model.modules()):
        if f"{type(module).__module__}.{type(module).__name__}" in _TIMM:
            _rebuild_timm(module)
        elif type(module).__name__ == "BlurPool2d" and getattr(module, "channels", None) is not None:
            # timm's anti-aliasing blur (TResNet) holds one copy of its fixed filter per channel, a buffer no pruner
            # cuts: it shares one, expanded to the channels it gets (its `channels` None), with the same outputs.
            module.channels, module.filt = None, module.filt[:1].clone()
    # EfficientViT-M's cascaded group attention adds each head's output to the next head's chunk of its input, so a
    # head's values are tied to a chunk of the stream it reads: that attention and the stream its projection writes stay
    # whole, with the reason (Torch-Pruning maps neither; its FFNs and the rest prune).
    cascaded = [name for name, m in model.named_modules() if f"{type(m).__module__}.{type(m).__name__}" == _CASCADED]
    for name in cascaded:
        for layer in model.get_submodule(name).modules():
            layer.keep_whole = True
    if cascaded:
        logging.getLogger("prunelab").warning(
            "%d cascaded group attention(s) kept whole (%s%s): each head adds its output to the next head's chunk of "
            "the stream, so their values and the stream they write keep their channels",
            len(cascaded),
            cascaded[0],
            ", ..." if len(cascaded) > 1 else "",
        )
    # A position bias the model shares among its blocks has every head: the heads, and the bias's layer with one output
    # per head, stay whole (`keep_whole`, read by groups_from_graph and attention_heads).
    shared = getattr(model, "shared_rel_pos", None)
    if isinstance(shared, nn.Module):
        for module in model.modules():
            if isinstance(module, RelativePositionAttention) or (
                isinstance(module, nn.Linear)
                and module in set(shared.modules())
                and module.out_features == shared.num_heads
            ):
                module.keep_whole = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__ if type(child).__module__.startswith("torchvision.") else None
            if isinstance(child, nn.MultiheadAttention) and type(parent).__name__ == "EncoderBlock":
                if child.batch_first and child._qkv_same_embed_dim and child.bias_k is None and not child.add_zero_attn:
                    setattr(parent, name, SelfAttention(child))
            elif kind in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
                setattr(parent, name, WindowSelfAttention(child))
            elif kind == "RelativePositionalMultiHeadAttention":
                setattr(parent, name, PartitionAttention(child))
