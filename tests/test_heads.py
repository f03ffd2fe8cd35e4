"""Attention heads as channel groups (structure/heads.py) in timm's own attention modules (ViT, Swin, LeViT, EVA):
whole heads or head dimensions removed compute what the dense model does with them silenced, uneven plans are refused,
and a ViT prunes to a FLOPs budget end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    SHAPE,
    equals_silenced_dense_and_reloads,
    make_cfg,
    pruned_and_reloaded,
    random_norms,
    silence,
)
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.export import save_model
from prunelab.structure import (
    ChannelPlan,
    apply_channel_plan,
    channel_groups,
    check_prunable,
    model_record,
)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)


TINY_SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4))


def test_heads_laid_out_head_by_head_are_pruned_whole(tmp_path):
    """LeViT's attention writes each head's query, key and value together (keys narrower than values) through a
    Linear + BatchNorm, its downsampling attention through two projections (q and kv): removing whole heads computes
    what the dense model does with those heads silenced, and the head count, widths and attention biases follow."""
    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = random_norms(create("timm:levit_128s", img_size=64).eval())  # LeViT starts its output BatchNorms at 0
    groups = {g.name: g for g in channel_groups(model, shape) if g.heads}
    attn, down = groups["stages.0.blocks.0.attn.qkv.linear"], groups["stages.1.downsample.attn_downsample.kv.linear"]
    assert (attn.size, attn.unit, attn.norms) == (4 * 64, 64, ["stages.0.blocks.0.attn.qkv.bn"])  # 4 heads of 16+16+32
    assert down.layers == [
        "stages.1.downsample.attn_downsample.kv.linear",
        "stages.1.downsample.attn_downsample.q.ln.linear",
    ]
    assert (down.size, sum(down.reads["stages.1.downsample.attn_downsample.proj.ln.linear"])) == (
        8 * 96,
        8 * 64,
    )  # values
    check_prunable(model, shape)  # BatchNorm only: against the dense model with the removed heads silenced

    dense = copy.deepcopy(model)
    keep = {attn.name: list(range(64, 128)) + list(range(192, 256)), down.name: list(range(5 * 96))}
    apply_channel_plan(model, ChannelPlan(keep, {attn.name: attn.size, down.name: down.size}), shape)
    block, sub = model.stages[0].blocks[0].attn, model.stages[1].downsample.attn_downsample
    assert (block.num_heads, block.val_attn_dim, tuple(block.attention_biases.shape)) == (2, 64, (2, 16))
    assert (sub.num_heads, sub.key_attn_dim, sub.q.ln.linear.out_features, sub.proj.ln.linear.in_features) == (
        5,
        80,
        80,
        320,
    )
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), silence(dense, groups, keep)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="splits a head"):
        apply_channel_plan(model, ChannelPlan({attn.name: [*range(32), *range(64, 96)]}, {attn.name: 128}), shape)
    model = create("timm:levit_128s", img_size=64).eval()
    pruned_and_reloaded(model, shape, 0.6, tmp_path)


def test_heads_of_1x1_convolutions_prune_and_their_products_are_not_traced_through(tmp_path):
    """LeViT's convolutional variant: the heads of 1x1 convolution projections prune whole; a matrix product of 4-D
    maps is not followed as channels (Torch-Pruning's flatten mappings around it multiplied the indices round the
    product without end: group discovery ran out of memory)."""
    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = random_norms(create("timm:levit_conv_128s", img_size=64).eval())
    heads = [g for g in channel_groups(model, shape) if g.heads]
    assert len(heads) == 11 and isinstance(model.get_submodule(heads[0].name), nn.Conv2d)
    check_prunable(model, shape)  # against the dense model with the removed heads silenced
    pruned_and_reloaded(model, shape, 0.6, tmp_path)
    assert model.stages[0].blocks[0].attn.num_heads < 4


def test_attention_heads_are_pruned_whole_and_compute_what_the_kept_heads_did(tmp_path):
    """Removing heads equals silencing them in the dense model (their output-projection columns zeroed)."""
    torch.manual_seed(0)
    model = create("timm:vit_tiny_patch16_224", **TINY_VIT).eval()
    dense = copy.deepcopy(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    heads = groups["blocks.0.attn.qkv"]
    assert (heads.size, heads.unit, heads.heads, heads.consumers) == (32, 8, "blocks.0.attn", ["blocks.0.attn.proj"])
    assert [n for n, g in groups.items() if g.heads is None] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    # Keep heads 1 and 3 of block 0, heads 0, 1, 2 of block 1.
    keep = {"blocks.0.attn.qkv": [*range(8, 16), *range(24, 32)], "blocks.1.attn.qkv": list(range(24))}
    apply_channel_plan(model, ChannelPlan(keep, dict.fromkeys(keep, 32)), SHAPE)
    assert [model.blocks[i].attn.num_heads for i in (0, 1)] == [2, 3]
    assert model.blocks[0].attn.qkv.weight.shape == (48, 32) and model.blocks[0].attn.proj.weight.shape == (32, 16)
    with torch.no_grad():
        for i, kept in enumerate(keep.values()):
            dropped = [c for c in range(32) if c not in kept]
            dense.blocks[i].attn.proj.weight[:, dropped] = 0
    equals_silenced_dense_and_reloads(model, dense, tmp_path)


@pytest.mark.parametrize("fused", [True, False])
def test_head_dimensions_are_pruned_and_compute_what_the_kept_dimensions_did(tmp_path, fused):
    """structure.prune_head_dim: every head keeps the same number of its own best dimensions; removing them
    equals zeroing their query, key and value rows in the dense model (the logits keep their 1/sqrt(D))."""
    from prunelab.budget import plan_by_counts

    torch.manual_seed(0)
    model = create("timm:vit_tiny_patch16_224", **TINY_VIT, qkv_bias=True).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    model_record(model).prune_head_dim = True
    dense = copy.deepcopy(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE) if g.heads}
    assert [(g.unit, g.multiple, g.blocks) for g in groups.values()] == [(1, 4, 4)] * 2
    check_prunable(model, SHAPE)
    scores = {name: torch.rand(g.size) for name, g in groups.items()}
    plan = plan_by_counts(scores, {"blocks.0.attn.qkv": 12, "blocks.1.attn.qkv": 20}, blocks=dict.fromkeys(groups, 4))
    for name, kept in plan.keep.items():
        per_head = [sum(c // 8 == h for c in kept) for h in range(4)]
        assert len(set(per_head)) == 1
        # Each head keeps its own best dimensions.
        assert all(
            {c % 8 for c in kept if c // 8 == h}
            == set(scores[name][8 * h : 8 * h + 8].topk(per_head[0]).indices.tolist())
            for h in range(4)
        )
    apply_channel_plan(model, plan, SHAPE)
    attn = [block.attn for block in model.blocks]
    assert [(a.num_heads, a.head_dim, a.attn_dim, a.qkv.out_features, a.proj.in_features) for a in attn] == [
        (4, 3, 12, 36, 12),
        (4, 5, 20, 60, 20),
    ]
    with torch.no_grad():
        for block, kept in zip(dense.blocks, plan.keep.values()):
            rows = [c + part * 32 for part in range(3) for c in range(32) if c not in kept]
            block.attn.qkv.weight[rows] = 0
            block.attn.qkv.bias[rows] = 0
        x = torch.randn(2, *SHAPE)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    model_record(model).input_shape = SHAPE
    reloaded = load_model(save_model(model, tmp_path / "vit.pt")).eval()
    for block in reloaded.blocks:
        block.attn.fused_attn = fused
    assert [b.attn.scale for b in reloaded.blocks] == [a.scale for a in attn] == [3**-0.5, 5**-0.5]
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_a_head_plan_with_uneven_heads_is_refused():
    model = create("timm:vit_tiny_patch16_224", **TINY_VIT).eval()
    keep = {"blocks.0.attn.qkv": [*range(8), *range(8, 12)]}
    with pytest.raises(ValueError, match=r"keeps 4 to 8 channels per head of 'blocks.0.attn'"):
        apply_channel_plan(model, ChannelPlan(keep, {"blocks.0.attn.qkv": 32}), SHAPE)


def test_window_attention_loses_head_dimensions(tmp_path):
    torch.manual_seed(0)
    model = create("timm:swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    model_record(model).prune_head_dim = True
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    attn = [model.layers[i].blocks[0].attn for i in (0, 1)]
    # Every head keeps half of its 8 dimensions, and its position-bias column.
    assert [a.num_heads for a in attn] == [2, 4] and all(
        a.relative_position_bias_table.shape[-1] == a.num_heads for a in attn
    )
    assert [(a.qkv.out_features, a.proj.in_features, a.scale) for a in attn] == [(24, 8, 0.5), (48, 16, 0.5)]


def test_window_attention_loses_heads_with_their_position_bias(tmp_path):
    torch.manual_seed(0)
    model = create("timm:swin_tiny_patch4_window7_224", **TINY_SWIN).eval()
    groups = channel_groups(model, SHAPE)
    assert [(g.name, g.unit) for g in groups if g.heads] == [
        ("layers.0.blocks.0.attn.qkv", 8),
        ("layers.1.blocks.0.attn.qkv", 8),
    ]
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    attn = model.layers[1].blocks[0].attn
    assert attn.num_heads == 2 and attn.relative_position_bias_table.shape[-1] == 2


@pytest.mark.parametrize("method", ["l1_filter", "random", "taylor"])
def test_a_timm_vit_prunes_to_a_flops_budget_end_to_end(tmp_path, method):
    vit = [f"+backbone.{k}={v}" for k, v in TINY_VIT.items()]
    cfg = make_cfg(tmp_path, "backbone=timm", "backbone.name=timm:vit_tiny_patch16_224", *vit,
                   f"method={method}", "budget.flops=0.6", "budget.tolerance=0.05")  # fmt: skip
    summary = pipeline.run(cfg, tmp_path)
    assert summary["model/flops_ratio"] == pytest.approx(0.6, rel=0.05)
    model = load_model(tmp_path / "model.pt")
    heads = [block.attn.num_heads for block in model.blocks]
    assert all(block.attn.qkv.out_features == 3 * 8 * h for block, h in zip(model.blocks, heads))
    assert model.patch_embed.proj.out_channels == 32


def test_a_timm_vit_loses_head_dimensions_end_to_end(tmp_path):
    vit = [f"+backbone.{k}={v}" for k, v in TINY_VIT.items()]
    cfg = make_cfg(tmp_path, "backbone=timm", "backbone.name=timm:vit_tiny_patch16_224", *vit, "method=l1_filter",
                   "budget.flops=0.6", "budget.tolerance=0.05", "structure.prune_head_dim=true")  # fmt: skip
    summary = pipeline.run(cfg, tmp_path)
    assert summary["model/flops_ratio"] == pytest.approx(0.6, rel=0.05)
    model = load_model(tmp_path / "model.pt")
    assert [block.attn.num_heads for block in model.blocks] == [4, 4]
    assert all(block.attn.qkv.out_features == 3 * 4 * block.attn.head_dim for block in model.blocks)
    assert any(block.attn.head_dim < 8 for block in model.blocks)


def test_heads_whose_projection_is_applied_as_a_function_are_kept_whole():
    """EVA's attention applies its qkv layer's weight through F.linear (with query and value biases of its own): the
    layer is not traced, so its heads are kept whole (the check failed with a KeyError before)."""
    shape = (3, 32, 32)
    model = create("timm:eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4).eval()
    assert not [g for g in channel_groups(model, shape) if g.heads]
    check_prunable(model, shape)
    # Its SwiGLU MLP (one Linear cut in halves on the last dimension) prunes its halves alike; a model with no group
    # left gets a structured budget's refusal in one line.
    from prunelab.budget import BudgetError, structured_plan

    assert [(g.name, g.tied) for g in channel_groups(model, shape)] == [("blocks.0.mlp.fc1", [0, 1])]
    ctx = type("Ctx", (), {"budget": {"flops": 0.5}, "input_shape": shape, "dense": {}})()
    with pytest.raises(BudgetError, match="no channel group of this model can lose channels"):
        structured_plan(model, {}, ctx)


def test_a_position_bias_shared_by_all_blocks_keeps_every_head():
    """A ViT whose blocks share one relative-position bias MLP (timm's vit_srelpos): its heads stay whole in every
    block and so do the MLP's per-head outputs (pruned as plain channels they broke the bias's view); the rest
    prunes."""
    shape = (3, 32, 32)
    model = create(
        "timm:vit_srelpos_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4
    ).eval()
    names = [g.name for g in channel_groups(model, shape)]
    assert names and not [n for n in names if n.endswith("attn.qkv") or n == "shared_rel_pos.mlp.fc2"]
    check_prunable(model, shape)
