"""torchvision's attention modules rebuilt in timm's layout at creation (backbones/torchvision_attention.py):
stock outputs from stock weights, whole heads or head dimensions removed compute what the dense model does with them
silenced, and a FLOPs budget is met end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    SHAPE,
    equals_silenced_dense_and_reloads,
    make_cfg,
    pruned_and_reloaded,
    register_backbones,
)
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create, registry
from prunelab.budget import BudgetError, CostModel, count_flops
from prunelab.export import export_deployable
from prunelab.structure import (
    ChannelPlan,
    apply_channel_plan,
    channel_groups,
    check_prunable,
    model_record,
)


@pytest.fixture(autouse=True)
def registered_models(monkeypatch):
    """This file's models, registered as backbones for its tests only (other files list the registry)."""
    register_backbones(
        monkeypatch,
        {
            "test_tiny_vit": _tiny_vit,
            "test_tiny_swin": _tiny_swin,
            "test_tiny_swin_v2": lambda **kw: _tiny_swin(v2=True, **kw),
            "test_tiny_maxvit": _tiny_maxvit,
        },
    )


def _tiny_vit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=num_classes
    )


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return create("test_tiny_vit").eval()


def test_torchvision_vit_prunes_heads_and_mlp_width_and_keeps_the_embedding_unless_asked(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    from prunelab.backbones.attention import SelfAttention

    # torchvision's MultiheadAttention is rebuilt in timm's layout at creation: same outputs, same weights.
    torch.manual_seed(0)
    stock = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    torch.save(stock.state_dict(), tmp_path / "stock.pt")
    model = create("test_tiny_vit", pretrained=str(tmp_path / "stock.pt")).eval()  # nn.MultiheadAttention's keys load
    assert isinstance(model.encoder.layers[0].self_attention, SelfAttention)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=0, atol=1e-6)
    again = create("test_tiny_vit").eval()
    again.load_state_dict(stock.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    groups = channel_groups(model, SHAPE)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in (0, 1)]
    assert [g.name for g in groups] == [f"{b}.{n}" for b in layers for n in ("self_attention.qkv", "mlp.0")]
    assert [g.unit for g in groups if g.heads] == [8, 8]
    pruned_and_reloaded(model, SHAPE, 0.6, tmp_path / "mlp")
    assert model.hidden_dim == 32

    model = tiny_vit()
    model_record(model).prune_embedding = True
    embedding = next(g for g in channel_groups(model, SHAPE) if g.embedding)
    # The attention width is its own group now: the embedding needs no multiple of the heads.
    assert (embedding.name, embedding.multiple) == ("conv_proj", 1)
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path / "embedding")
    width = model.conv_proj.out_channels
    assert width < 32 and model.hidden_dim == width
    attention = model.encoder.layers[0].self_attention
    assert attention.qkv.in_features == width and attention.num_heads == 2


def _tiny_swin(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, v2: bool = False) -> nn.Module:
    from torchvision.models import swin_transformer as swin

    blocks = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    # Stage 1: 4 heads of 4 dimensions (a head_dim equal to the head count, as in Swin-B's last stage).
    return swin.SwinTransformer([2, 2], 16, [2, 2], [4, 4], [4, 4], num_classes=num_classes, **blocks)


def _tiny_maxvit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit((32, 32), 8, 2, [16, 32], [1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=num_classes)


def _attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from prunelab.backbones.attention import Relaid

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Relaid)]


@pytest.mark.parametrize("name", ["test_tiny_swin", "test_tiny_swin_v2", "test_tiny_maxvit"])
def test_torchvision_window_attention_loses_whole_heads(tmp_path, name):
    """torchvision's Swin (V1, V2) and MaxViT attention is rebuilt at creation: stock outputs from stock
    weights (shifted and padded windows included), then whole heads removed with their position bias
    (V2: logit scales, bias-MLP rows) compute what the dense model computes with those heads silenced."""
    torch.manual_seed(0)
    stock = registry._REGISTRY[name]().eval()
    for p in stock.parameters():  # away from the initialisation's zeros and ones, so that every tensor matters
        nn.init.normal_(p, std=0.2)
    torch.save(stock.state_dict(), tmp_path / "stock.pt")
    model = create(name, pretrained=str(tmp_path / "stock.pt")).eval()
    attentions = _attentions(model)
    assert len(attentions) == 4
    shapes = [SHAPE, (3, 36, 36)] if "swin" in name else [SHAPE]  # 36: padded to whole windows
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(2, *shape)
            assert torch.equal(model(x), stock(x))
    check_prunable(model, SHAPE)  # every group, heads included, loses half its channels in a trial
    dense = copy.deepcopy(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE) if g.heads}
    assert sorted(groups) == sorted(f"{n}.qkv" for n, _ in attentions)
    # Keep the last head of each.
    keep = {qkv: list(range(g.size - g.unit, g.size)) for qkv, g in groups.items()}
    plan = ChannelPlan(keep, {qkv: g.size for qkv, g in groups.items()})
    costs = CostModel(model, list(groups.values()), SHAPE)
    assert all(
        n > 0 for n in costs.products.values()
    )  # the query-key and attention-value products scale with the heads
    apply_channel_plan(model, plan, SHAPE)
    assert costs.count(plan)["flops"] == count_flops(model, SHAPE)
    for (_, m), (_, d) in zip(_attentions(model), _attentions(dense)):
        assert m.num_heads == 1 and m.qkv.out_features == 3 * m.head_dim == 3 * d.head_dim
        per_head = [
            p
            for n, p in m.named_parameters()
            if n in ("relative_position_bias_table", "logit_scale", "cpb_mlp.2.weight")
        ]
        assert per_head and all(p.shape[-1] == 1 or p.shape[0] == 1 for p in per_head)
        with torch.no_grad():
            d.proj.weight[:, : d.proj.in_features - d.head_dim] = 0
    with torch.no_grad():
        x = torch.randn(2, *SHAPE)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    export_deployable(model, tmp_path / "model.onnx", SHAPE, "onnx")  # reloaded in onnxruntime, checked on a batch of 3
    pruned_and_reloaded(model, SHAPE, None, tmp_path / "again")


@pytest.mark.parametrize("name", ["test_tiny_swin", "test_tiny_maxvit"])
def test_torchvision_window_attention_loses_head_dimensions(tmp_path, name):
    """With prune_head_dim the kept dimensions' logits keep their scale: Swin's D^-1/2, MaxViT's embedding
    width's; removing dimensions equals zeroing their query, key and value rows. Swin V2 normalises queries
    and keys over the head dimension, so its heads stay whole."""
    torch.manual_seed(0)
    model = create(name).eval()
    model_record(model).prune_head_dim = True
    check_prunable(model, SHAPE)
    dense = copy.deepcopy(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE) if g.heads}
    assert all(g.unit == 1 and g.blocks == g.multiple > 1 for g in groups.values())
    # Every head keeps its first half.
    keep = {
        qkv: [c for c in range(g.size) if c % (g.size // g.blocks) < g.size // g.blocks // 2]
        for qkv, g in groups.items()
    }
    apply_channel_plan(model, ChannelPlan(keep, {qkv: g.size for qkv, g in groups.items()}), SHAPE)
    for (_, m), (_, d) in zip(_attentions(model), _attentions(dense)):
        assert m.head_dim == d.head_dim // 2 and m.num_heads == d.num_heads
        assert m.scale == pytest.approx(d.scale * 2**0.5)
        with torch.no_grad():
            rows = [r for r in range(d.qkv.out_features) if r % d.head_dim >= d.head_dim // 2]
            d.qkv.weight[rows] = 0
            d.qkv.bias[rows] = 0
    equals_silenced_dense_and_reloads(model, dense, tmp_path)
    v2 = create("test_tiny_swin_v2")
    model_record(v2).prune_head_dim = True
    assert [(g.unit, g.blocks) for g in channel_groups(v2, SHAPE) if g.heads] == [(4, 1)] * 2 + [(8, 1)] * 2


@pytest.mark.parametrize("name", ["test_tiny_swin_v2", "test_tiny_maxvit"])
def test_torchvision_window_attention_prunes_to_a_flops_budget_end_to_end(tmp_path, name):
    cfg = make_cfg(
        tmp_path, "backbone=timm", f"backbone.name={name}", "method=taylor", "budget.flops=0.6", "budget.tolerance=0.05"
    )
    summary = pipeline.run(cfg, tmp_path)
    assert summary["model/flops_ratio"] == pytest.approx(0.6, rel=0.05)
    model = load_model(tmp_path / "model.pt")
    assert all(m.qkv.out_features == 3 * m.num_heads * m.head_dim for _, m in _attentions(model))


# The structured baselines on a transformer that L1 prunes (heads and MLP width), with budget.round_to=8.
@pytest.mark.parametrize(
    "method, extra",
    [
        ("fpgm", []),
        ("sfp", ["method.epochs=1"]),
        ("thinet", ["method.batches=1", "method.samples=4"]),
        ("depgraph", ["method.epochs=1"]),
    ],
)
def test_the_structured_baselines_prune_a_vit_as_l1_does(tmp_path, method, extra):
    summaries, plans = {}, {}
    for name, settings in (("l1_filter", []), (method, extra)):
        run = tmp_path / name
        cfg = make_cfg(
            run,
            "backbone=timm",
            "backbone.name=test_tiny_vit",
            f"method={name}",
            *settings,
            "budget.flops=0.6",
            "budget.round_to=8",
            "budget.tolerance=0.05",
            "retrain=none",
            "latency.batch_sizes=[]",
        )
        summaries[name] = pipeline.run(cfg, run)
        (prune,) = run.glob("stages/*-prune")
        plans[name] = ChannelPlan.load_json(prune / "plan.json")
    assert set(plans[method].keep) == set(plans["l1_filter"].keep)  # heads and MLP width, as for L1
    assert summaries[method]["model/flops_ratio"] == pytest.approx(0.6, abs=0.03)
    model = load_model(tmp_path / method / "model.pt")
    assert all(m.qkv.out_features == 3 * m.num_heads * m.head_dim for _, m in _attentions(model))
    widths = [layer.mlp[0].out_features for layer in model.encoder.layers]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 64
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_hrank_refuses_a_vit_in_one_line(tmp_path):
    # HRank ranks 2-D feature maps; a ViT's heads and MLP features have none, so no group can lose channels.
    cfg = make_cfg(
        tmp_path, "backbone=timm", "backbone.name=test_tiny_vit", "method=hrank", "budget.flops=0.6", "retrain=none"
    )
    with pytest.raises(BudgetError, match=r"^no channel group of this model can lose channels") as caught:
        pipeline.run(cfg, tmp_path)
    assert "\n" not in str(caught.value)
