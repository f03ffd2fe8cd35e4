"""timm's attention modules that derive their head width from the embedding, rebuilt at creation
(backbones/timm_attention.py, backbones/attention.py): they compute what timm's do with the same weights, their heads
prune whole (or by dimension where heads are mixed), and what no pruner maps is kept whole with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    SHAPE,
    conv_bn,
    pruned_and_reloaded,
    register_backbones,
)
from torch import nn

from prunelab.backbones import create, registry
from prunelab.budget import CostModel, count_flops, count_params
from prunelab.structure import (
    ChannelPlan,
    apply_channel_plan,
    channel_groups,
    check_prunable,
)


@pytest.fixture(autouse=True)
def registered_models(monkeypatch):
    """This file's models, registered as backbones for its tests only (other files list the registry)."""
    register_backbones(
        monkeypatch,
        {
            "test_cascaded": Cascaded,
            "test_tiny_volo": _tiny_volo,
            "test_tiny_caformer": _tiny_caformer,
            "test_tiny_nest": _tiny_nest,
            "test_tiny_gcvit": _tiny_gcvit,
            "test_tiny_mvitv2": _tiny_mvitv2,
            "test_tiny_mvitv2_one_head": lambda **kw: _tiny_mvitv2(heads=1, **kw),
            "test_tiny_lambda": _tiny_lambda,
            "test_tiny_shvit": _tiny_shvit,
            "test_tiny_resnest": _tiny_resnest,
        },
    )


class Cascaded(nn.Module):
    """timm's EfficientViT-M block in small: cascaded group attention (each head adds its output to the next head's
    chunk of the stream) and an FFN, both residual."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.models.efficientvit_msra import CascadedGroupAttention

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16))
        self.attn = CascadedGroupAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=8)
        self.ffn = nn.Sequential(conv_bn(16, 32), conv_bn(32, 16, act=False))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.attn(x)
        return self.fc((x + self.ffn(x)).mean((2, 3)))


def test_cascaded_group_attention_and_its_stream_are_kept_whole_with_a_reason_and_the_ffn_prunes(tmp_path, caplog):
    """A head's values are added to the next head's chunk of the stream (EfficientViT-M): no pruner maps that, so the
    attention and the stream stay whole, said at creation, and the FFN's hidden width prunes (it was refused before)."""
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="prunelab"):
        model = create("test_cascaded").eval()
    assert (
        "1 cascaded group attention(s) kept whole (attn): each head adds its output to the next head's chunk"
        in caplog.text
    )
    for module in model.attn.modules():  # timm's zero-initialised biases and projection BatchNorm hide a wrong mapping
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    nn.init.normal_(model.attn.attention_biases)
    assert [g.name for g in channel_groups(model, SHAPE)] == ["ffn.0.0"]
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert (
        model.ffn[0][0].out_channels < 32
        and model.stem[0].out_channels == 16
        and model.attn.qkvs[0].conv.out_channels == 16
    )


def _tiny_volo(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.volo import VOLO  # timm's volo_* entry points fix the layers: built from the class

    return VOLO(
        layers=(1, 1),
        img_size=32,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dims=(16, 32),
        num_heads=(2, 4),
        downsamples=(True, False),
        outlook_attention=(True, False),
        mlp_ratio=2.0,
        post_layers=("ca",),
        stem_hidden_dim=16,
    )


def _tiny_nest(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.nest import Nest

    return Nest(
        img_size=32,
        in_chans=in_channels,
        patch_size=4,
        num_levels=2,
        embed_dims=(32, 64),
        num_heads=(2, 4),
        depths=(1, 1),
        num_classes=num_classes,
    )


def _tiny_gcvit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(
        in_chans=in_channels,
        num_classes=num_classes,
        img_size=64,
        embed_dim=8,
        depths=(2, 2, 1, 1),
        num_heads=(2, 2, 4, 8),
        mlp_ratio=2.0,
    )


def _tiny_mvitv2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, heads: int = 2) -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(
        MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=heads),
        img_size=(32, 32),
        in_chans=in_channels,
        num_classes=num_classes,
    )


def _tiny_lambda(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    blocks = (
        ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
        ByoBlockCfg(type="self_attn", d=2, c=64, s=2, gs=0, br=0.25),
    )
    cfg = ByoModelCfg(
        blocks=blocks,
        stem_chs=16,
        stem_type="tiered",
        stem_pool="maxpool",
        self_attn_layer="lambda",
        self_attn_kwargs=dict(r=3, dim_head=4),
    )
    return ByobNet(cfg, in_chans=in_channels, num_classes=num_classes)


def _tiny_shvit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.shvit import SHViT

    return SHViT(
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=(16, 32, 48),
        partial_dim=(8, 8, 16),
        qk_dim=(4, 4, 4),
        depth=(1, 1, 1),
    )


def _tiny_resnest(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.resnest import ResNestBottleneck
    from timm.models.resnet import ResNet

    return ResNet(
        block=ResNestBottleneck,
        layers=[1, 1, 1, 1],
        channels=(8, 8, 16, 16),
        in_chans=in_channels,
        num_classes=num_classes,
        stem_type="deep",
        stem_width=8,
        avg_down=True,
        base_width=64,
        cardinality=1,
        block_args=dict(radix=2, avd=True, avd_first=False),
    )


def _tiny_caformer(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(
        in_chans=in_channels,
        num_classes=num_classes,
        depths=(1, 1, 1, 1),
        dims=(8, 16, 64, 64),
        token_mixers=(SepConv, SepConv, Attention, Attention),
        norm_layers=(LayerNorm2dNoBias,) * 2 + (LayerNormNoBias,) * 2,
    )


# timm attentions that derive their head width from the embedding, as tiny configurations: (model, arguments, input
# side, the rebuilt classes and how many of each are head groups).
TIMM_HEAD_WIDTH = {
    "cait_xxs24_224": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, depth_token_only=1),
        32,
        {"ClassAttn": 1, "TalkingHeadAttn": 1},
    ),
    "crossvit_tiny_240": (
        dict(
            img_size=48,
            img_scale=(1.0, 1.0),
            patch_size=[8, 16],
            embed_dim=[24, 48],
            depth=[[1, 1, 0]],
            num_heads=[3, 3],
            mlp_ratio=[2, 2, 1],
        ),
        48,
        {"CrossAttention": 2},
    ),
    "twins_svt_small": (
        dict(
            img_size=32,
            embed_dims=[16, 32],
            num_heads=[2, 4],
            mlp_ratios=[2, 2],
            depths=[2, 2],
            wss=[4, 4],
            sr_ratios=[2, 1],
        ),
        32,
        {"LocallyGroupedAttn": 2, "GlobalSubSampleAttn": 2},
    ),
    "convit_tiny": (
        dict(img_size=32, patch_size=8, embed_dim=8, num_heads=4, depth=2, local_up_to_layer=1),
        32,
        {"GPSA": 1, "MHSA": 1},
    ),
    "edgenext_xx_small": (
        dict(depths=(1, 1, 1, 1), dims=(16, 16, 24, 32), heads=(2, 2, 2, 2)),
        64,
        {"CrossCovarianceAttn": 3},
    ),
    "mobilevitv2_050": ({}, 64, {"LinearSelfAttention": 9}),
    "pvt_v2_b2_li": (
        dict(embed_dims=(16, 32), num_heads=(2, 4), mlp_ratios=(2, 2), depths=(1, 1), sr_ratios=(2, 1)),
        32,
        {"Attention": 2},
    ),
    "xcit_nano_12_p16_224": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1),
        32,
        {"XCA": 1, "ClassAttn": 1},
    ),
    "vit_relpos_small_patch16_224": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4),
        32,
        {"RelPosAttention": 1},
    ),
    "vit_relpos_base_patch16_clsgap_224": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4),
        32,
        {"RelPosAttention": 1},
    ),
    "test_tiny_volo": ({}, 32, {"OutlookAttention": 1, "Attention": 1, "ClassAttention": 1}),
    "test_tiny_caformer": ({}, 32, {"Attention": 2}),
    "test_tiny_nest": ({}, 32, {"Attention": 2}),
    "davit_tiny": (
        dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 4), window_size=4),
        32,
        {"WindowAttention": 2, "ChannelAttention": 2},
    ),
    "tnt_s_patch16_224": (
        dict(img_size=32, patch_size=8, embed_dim=48, inner_dim=16, depth=1, num_heads_outer=4, num_heads_inner=2),
        32,
        {"Attention": 2},
    ),
    "fastvit_mci0": (
        dict(layers=(1, 1, 1, 1), embed_dims=(16, 16, 32, 64), mlp_ratios=(4, 4, 4, 4)),
        64,
        {"Attention": 1},
    ),
    "nextvit_small": (dict(depths=(1, 1, 5, 1)), 64, {"EfficientAttention": 3}),
    "hiera_tiny_224": (dict(img_size=64, embed_dim=16, num_heads=2, stages=(1, 1, 1, 1)), 64, {"MaskUnitAttention": 4}),
    "swinv2_cr_tiny_224": (
        dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
        32,
        {"WindowMultiHeadAttention": 4},
    ),
    "test_tiny_gcvit": ({}, 64, {"WindowAttentionGlobal": 4}),  # the two global-query blocks keep their heads
    "test_tiny_mvitv2": ({}, 32, {"MultiScaleAttention": 2}),
}


@pytest.mark.parametrize("name", list(TIMM_HEAD_WIDTH))
def test_timm_attention_deriving_its_head_width_from_the_embedding_loses_whole_heads(name, tmp_path):
    """CaiT's class attention and CrossViT's cross-attention (the first token's query; q, k, v projections), CaiT's
    talking heads (heads mixed: each keeps fewer dimensions instead), Twins'
    sub-sampled (q + kv) and windowed attention, ConViT's gated positional attention (qk + v + a positional score per
    head) and plain one, EdgeNeXt's cross-covariance attention, MobileViTv2's separable attention (a key/value channel
    pair per head, beside a shared query row), TNT's (values wider than queries and keys), ViT's with a relative
    position bias per head (a table or an MLP, pruned with the heads), VOLO's outlook attention (k^4 window weights
    per head), plain attention on maps and class attention, DaViT's windowed and channel attention, CAFormer's,
    FastViT's (on (B, C, H, W) maps), Next-ViT's (q, k, v projections; keys and values from pooled tokens), Hiera's
    mask-unit attention (pooled queries), timm's Swin V2 CR (cosine attention, a meta-MLP bias and logit scale per
    head), NesT's (heads read by `proj` dimension by dimension), GCViT's (local blocks; the global-query ones keep their
    heads), MViTv2's pooling attention (output width `dim_out` read as the heads' joint width):
    rebuilt at creation, they compute what timm's modules
    do with the same weights; removing heads computes what the dense model does with those heads silenced, and the
    pruned model reloads."""
    import timm

    arguments, side, expected = TIMM_HEAD_WIDTH[name]
    shape = (3, side, side)
    torch.manual_seed(0)
    backbone = name if name.startswith("test_") else f"timm:{name}"  # a registered test model, built by timm's class
    model = create(backbone, **arguments).eval()
    stock = registry._REGISTRY[name]() if backbone == name else timm.create_model(name, num_classes=10, **arguments)
    stock.eval().load_state_dict(model.state_dict())
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)

    groups = [g for g in channel_groups(model, shape) if g.heads]
    found: dict[str, int] = {}
    for group in groups:
        kind = type(model.get_submodule(group.heads)).__name__
        found[kind] = found.get(kind, 0) + 1
    assert {kind: found.get(kind, 0) for kind in expected} == expected
    check_prunable(model, shape)

    # Keep every other head (at least one) of each attention, or where heads are mixed (CaiT's talking heads) every
    # other dimension of each head; silence the others in the dense model (their query, key and value rows zeroed).
    dense, keep, widths = copy.deepcopy(model), {}, {}
    with torch.no_grad():
        for group in groups:
            if group.blocks > 1:
                keep[group.name] = list(range(1, group.size, 2))
            else:
                keep[group.name] = [
                    c
                    for h in range(1, group.size // group.unit, 2)
                    for c in range(h * group.unit, (h + 1) * group.unit)
                ]
            attention = model.get_submodule(group.heads)
            widths[group.heads] = (attention.num_heads, attention.head_dim)
            rows = group.rows or {
                group.layers[0]: [[c + part * group.size for part in range(3)] for c in range(group.size)]
            }
            for layer, held in rows.items():
                dropped = [r for c in range(group.size) if c not in keep[group.name] for r in held[c]]
                for tensor in (dense.get_submodule(layer).weight, dense.get_submodule(layer).bias):
                    if tensor is not None:
                        tensor[dropped] = 0
    plan = ChannelPlan(keep, {g.name: g.size for g in groups})
    costs = CostModel(model, channel_groups(model, shape), shape).count(plan)
    apply_channel_plan(model, plan, shape)
    # The cost model counts, from the plan alone, what the pruned model counts: its products, per-head rows and tables.
    assert costs == {"flops": count_flops(model, shape), "params": count_params(model)}
    for attention, (heads, dim) in widths.items():
        mixed = getattr(model.get_submodule(attention), "heads_mix", False)
        assert (model.get_submodule(attention).num_heads, model.get_submodule(attention).head_dim) == (
            (heads, dim // 2) if mixed else (heads // 2, dim)
        )
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    pruned_and_reloaded(create(backbone, **arguments).eval(), shape, 0.7, tmp_path)


def test_a_single_head_attention_keeps_its_head(tmp_path):
    """A timm attention with one head (MViTv2's first stage) is a head group that cannot lose its head, not a group of
    plain channels of `qkv` (whose rows Torch-Pruning mapped onto the output projection: refused by the check)."""
    model = create("test_tiny_mvitv2_one_head").eval()
    shape = (3, 32, 32)
    attention = model.stages[0].blocks[0].attn
    assert attention.num_heads == 1
    group = next(g for g in channel_groups(model, shape) if g.heads == "stages.0.blocks.0.attn")
    assert group.size == group.unit == attention.head_dim
    assert not any("stages.0.blocks.0.attn.qkv" in g.layers for g in channel_groups(model, shape) if not g.heads)
    check_prunable(model, shape)
    model = pruned_and_reloaded(model, shape, 0.6, tmp_path)
    assert model.stages[0].blocks[0].attn.qkv.out_features == 3 * attention.head_dim


@pytest.mark.parametrize("name", ["test_tiny_lambda", "test_tiny_shvit"])
def test_timm_layers_laid_out_to_their_input_width_compute_with_their_own(name, tmp_path):
    """timm's lambda layer (output reshaped to the input's width) and SHViT's partial single-head attention (the
    stream split into `pdim` and `dim - pdim` channels, the values reshaped to `pdim`): rebuilt at creation, they
    compute what timm's do with the same weights, the channels they read prune apart from what they write, and the
    pruned model reloads."""
    shape = (3, 32, 32) if name == "test_tiny_lambda" else (3, 64, 64)
    torch.manual_seed(0)
    model = create(name).eval()
    stock = registry._REGISTRY[name]().eval()
    stock.load_state_dict(model.state_dict())
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)
    kind = "LambdaLayer" if name == "test_tiny_lambda" else "SHSA"
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == kind}
    reader = "qkv" if name == "test_tiny_lambda" else "qkv.c"
    readers = {f"{n}.{reader}" for n in layers}
    groups = channel_groups(model, shape)
    # The channels each layer reads belong to a group that can lose them.
    assert readers <= {c for g in groups for c in g.consumers}
    check_prunable(model, shape)
    before = {n: list(m.sections) for n, m in layers.items()} if kind == "SHSA" else {}
    pruned = pruned_and_reloaded(model, shape, None, tmp_path)
    for n in layers:
        reads = pruned.get_submodule(f"{n}.{reader}")
        assert reads.in_channels < stock.get_submodule(f"{n}.{reader}").in_channels
        if kind == "SHSA":
            m = pruned.get_submodule(n)
            assert reads.in_channels == m.sections[0] < before[n][0] and m.sections[1] < before[n][1]


def test_radix_splits_of_split_attention_lose_the_same_channels(tmp_path):
    """ResNeSt's split attention: the radix convolution (groups=radix, writing radix splits) and the attention's fc2
    (softmax across the splits) lose channel p of every split together, the same count in each convolution group;
    the model computes what timm's does, the check holds the pruned copy to the silenced dense one (BatchNorm only),
    and a budget is met (before, every radix convolution was kept whole: resnest14d could not go below 0.55 of its
    FLOPs)."""
    torch.manual_seed(0)
    model = create("test_tiny_resnest").eval()
    stock = registry._REGISTRY["test_tiny_resnest"]().eval()
    stock.load_state_dict(model.state_dict())
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    radix = [g for name, g in groups.items() if name.endswith("conv2.conv")]
    assert len(radix) == 4 and all((g.blocks, g.tied, g.layers[-1].endswith("fc2")) == (2, [0, 1], True) for g in radix)
    check_prunable(model, SHAPE)
    model = pruned_and_reloaded(model, SHAPE, None, tmp_path)
    convs = [model.get_submodule(g.name) for g in radix]
    assert all(
        c.groups == 2 and 2 * c.out_channels == stock.get_submodule(g.name).out_channels for c, g in zip(convs, radix)
    )
    pruned_and_reloaded(create("test_tiny_resnest").eval(), SHAPE, 0.4, tmp_path)


def test_heads_whose_logits_are_mixed_lose_dimensions_not_heads():
    """CaiT's talking heads mix the heads' logits (before and after the softmax): the head group prunes by dimension,
    the same count in every head, and a plan removing a whole head is refused in one line."""
    arguments, side, _ = TIMM_HEAD_WIDTH["cait_xxs24_224"]
    shape = (3, side, side)
    model = create("timm:cait_xxs24_224", **arguments).eval()
    group = next(g for g in channel_groups(model, shape) if g.heads == "blocks.0.attn")
    assert (group.size, group.unit, group.blocks) == (32, 1, 4)
    with pytest.raises(ValueError, match=r"removes whole heads of 'blocks.0.attn', whose heads' logits are mixed"):
        apply_channel_plan(model, ChannelPlan({group.name: list(range(8, 32))}, {group.name: 32}), shape)
