"""Tests for channel groups, plans, channel surgery, persistent masks and re-initialisation."""

from __future__ import annotations

import copy
import json
import logging
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPE, make_cfg, randomize_bn
from torch import nn

from prunelab import pipeline
from prunelab.backbones import create
from prunelab.budget import count_flops, count_params, keep_count, plan_by_counts, search_threshold, sparsity
from prunelab.export import load_model, save_model
from prunelab.structure import (
    ChannelPlan,
    MaskPlan,
    apply_channel_plan,
    attach_masks,
    channel_groups,
    fold_masks,
    group_weights,
    has_masks,
    model_record,
    reinitialize,
    root_weights,
    zero_masked_,
)


class TinyDenseNet(nn.Module):
    """A DenseNet-style net: each layer's output is concatenated onto its input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(12, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.transition = nn.Conv2d(18, 8, 1, bias=False)
        self.bn_t = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = torch.cat([x, F.relu(self.bn_a(self.conv_a(x)))], 1)
        x = torch.cat([x, F.relu(self.bn_b(self.conv_b(x)))], 1)
        x = F.relu(self.bn_t(self.transition(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    if name == "concat":
        return TinyDenseNet()
    return create(name, **kwargs)


def half_plan(model: nn.Module, seed: int = 0) -> ChannelPlan:
    rng = random.Random(seed)
    groups = channel_groups(model, SHAPE)
    keep = {g.name: sorted(rng.sample(range(g.size), max(1, g.size // 2))) for g in groups}
    return ChannelPlan(keep, {g.name: g.size for g in groups})


def out_size(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


MODELS = [
    ("resnet_tiny", {}),
    ("resnet_tiny", {"shortcut": "B"}),
    ("vgg_tiny", {}),
    ("mobilenet_v1_tiny", {}),
    ("mobilenet_v2_tiny", {}),
    ("wrn_tiny", {}),
    ("resnet_imagenet_tiny", {}),
    ("timm:resnet18", {}),
    ("torchvision:mobilenet_v3_small", {}),
    ("concat", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), MODELS, ids=[f"{n}{k}" for n, k in MODELS])
def test_half_plan_shrinks_every_architecture(name: str, kwargs: dict) -> None:
    model = build(name, **kwargs).eval()
    dense_flops, dense_params = count_flops(model, SHAPE), count_params(model)
    groups = channel_groups(model, SHAPE)
    plan = half_plan(model)
    apply_channel_plan(model, plan, SHAPE)

    out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10)
    assert count_params(model) < dense_params
    assert count_flops(model, SHAPE) < dense_flops
    # Every layer producing a group's channels now has exactly the kept number of outputs.
    for group in groups:
        for layer in group.layers:
            module = model.get_submodule(layer)
            assert out_size(module) == len(plan.keep[group.name]) == module.weight.shape[0], layer
    # The pruned model has the same groups, now of the kept sizes.
    after = channel_groups(model, SHAPE)
    assert [g.name for g in after] == [g.name for g in groups]
    assert {g.name: g.size for g in after} == plan.kept()
    assert model.prunelab.plans == [plan]


def test_groups_of_cifar_resnets() -> None:
    groups_a = channel_groups(build("resnet_tiny"), SHAPE)
    groups_b = channel_groups(build("resnet_tiny", shortcut="B"), SHAPE)
    by_name = {g.name: g for g in groups_b}
    assert [g.name for g in groups_a] == [
        "conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2",
    ]  # fmt: skip
    stream = groups_a[0]
    assert (stream.size, stream.layers, stream.stage, stream.layer_index, stream.coupled) == (
        16, ["conv1", "layer1.0.conv2"], 0, 0, True,
    )  # fmt: skip
    # Option A pads channels without parameters, so a later stage's stream has one producer.
    assert not groups_a[3].coupled
    b2 = by_name["layer2.0.conv2"]
    assert (b2.size, b2.layers, b2.stage, b2.layer_index, b2.coupled) == (
        32, ["layer2.0.conv2", "layer2.0.shortcut.0"], 2, 4, True,
    )  # fmt: skip
    assert [w.shape[0] for w in group_weights(build("resnet_tiny", shortcut="B"), b2)] == [32, 32]
    model = build("resnet_tiny")
    assert root_weights(model, groups_a[1]) is model.layer1[0].conv1.weight
    # The classifier's outputs are never a group.
    assert all("linear" not in layer for g in groups_a for layer in g.layers)


def test_depthwise_joins_the_group_feeding_it() -> None:
    groups = {g.name: g for g in channel_groups(build("mobilenet_v2_tiny"), SHAPE)}
    expand = groups["features.1.conv.0.0"]
    assert expand.layers == ["features.1.conv.0.0", "features.1.conv.1.0"]
    assert expand.size == 16 and not expand.coupled
    assert groups["stem.0"].coupled
    assert "features.1.conv.1.0" not in groups


def test_channel_groups_leaves_training_state_alone() -> None:
    model = build("resnet_tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, SHAPE)
    assert model.training and model.layer1[0].bn1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def bn_after(model: nn.Module, layer: str) -> nn.BatchNorm2d:
    """The first BatchNorm after `layer` in module order (its own BN in these families)."""
    seen = False
    for name, module in model.named_modules():
        if name == layer:
            seen = True
        elif seen and isinstance(module, nn.BatchNorm2d):
            return module
    raise AssertionError(f"no BatchNorm after {layer}")


ZERO_CASES = [
    ("vgg_tiny", {}, {"features.4": [1, 5], "features.0": [3]}),
    # Inner block channels and the stage-1 residual stream; channel 0 of stage 2 is a zero-padding slot.
    ("resnet_tiny", {}, {"layer1.0.conv1": [2, 3], "conv1": [0, 7], "layer2.0.conv2": [0, 1]}),
    ("resnet_tiny", {"shortcut": "B"}, {"layer1.0.conv1": [1], "conv1": [4], "layer2.0.conv2": [3, 30]}),
    ("mobilenet_v2_tiny", {}, {"stem.0": [2], "features.1.conv.0.0": [0, 5], "features.1.conv.2": [4]}),
    ("concat", {}, {"stem": [1, 6], "conv_a": [2], "conv_b": [0, 5]}),
]


@pytest.mark.parametrize(("name", "kwargs", "removed"), ZERO_CASES, ids=[f"{c[0]}{c[1]}" for c in ZERO_CASES])
def test_removing_dead_channels_changes_nothing(name: str, kwargs: dict, removed: dict[str, list[int]]) -> None:
    model = build(name, **kwargs)
    randomize_bn(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    # Zero the BN of every producer of these channels, so they are exactly 0 everywhere they are read.
    for group_name, channels in removed.items():
        for layer in groups[group_name].layers:
            bn = bn_after(model, layer)
            bn.weight.data[channels] = 0.0
            bn.bias.data[channels] = 0.0
    model.eval()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected = model(x)
    keep = {n: [i for i in range(groups[n].size) if i not in chans] for n, chans in removed.items()}
    apply_channel_plan(model, ChannelPlan(keep, {n: groups[n].size for n in removed}), SHAPE)
    with torch.no_grad():
        got = model(x)
    assert count_params(model) < sum(p.numel() for p in build(name, **kwargs).parameters())
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_keeping_every_channel_is_the_identity(name: str) -> None:
    model = build(name)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_channel_plan(model, ChannelPlan.full(channel_groups(model, SHAPE)), SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_plans_compose_and_refuse_other_architectures() -> None:
    model = build("resnet_tiny")
    first = half_plan(model)
    apply_channel_plan(model, first, SHAPE)
    # The first plan no longer fits: its sizes are those of the dense model.
    with pytest.raises(ValueError, match="another architecture"):
        apply_channel_plan(model, first, SHAPE)
    second = half_plan(model, seed=1)
    apply_channel_plan(model, second, SHAPE)
    assert model.prunelab.plans == [first, second]
    assert model.layer3[0].conv1.out_channels == 16
    with pytest.raises(ValueError, match=r"another architecture.*layer1.0.conv1"):
        apply_channel_plan(build("vgg_tiny"), ChannelPlan({"layer1.0.conv1": [0]}, {"layer1.0.conv1": 16}), SHAPE)


def test_channel_plan_validation_and_json(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'g1'.*no channel"):
        ChannelPlan({"g1": []}, {"g1": 4})
    with pytest.raises(ValueError, match=r"'g1'.*out of range"):
        ChannelPlan({"g1": [0, 4]}, {"g1": 4})
    with pytest.raises(ValueError, match=r"'g1'.*more than once"):
        ChannelPlan({"g1": [1, 1]}, {"g1": 4})
    plan = ChannelPlan({"a": [3, 0], "b": [1]}, {"a": 4, "b": 2})
    assert plan.keep == {"a": [0, 3], "b": [1]} and plan.kept() == {"a": 2, "b": 1}
    assert plan.to_dict()["summary"] == {"a": "2/4", "b": "1/2"}
    plan.save_json(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["keep"] == {"a": [0, 3], "b": [1]}
    assert ChannelPlan.load_json(tmp_path / "plan.json") == plan


def exact_masks(model: nn.Module, fraction: float) -> tuple[MaskPlan, int, int]:
    """Masks removing floor(fraction * n) entries of each conv/linear weight; returns (plan, pruned, total)."""
    gen = torch.Generator().manual_seed(0)
    masks, pruned, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            n = module.weight.numel()
            k = math.floor(fraction * n)
            mask = torch.ones(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=gen)[:k]] = False
            masks[f"{name}.weight"] = mask.view_as(module.weight)
            pruned, total = pruned + k, total + n
    return MaskPlan(masks), pruned, total


def test_masks_survive_training_and_fold(tmp_path) -> None:
    model = build("resnet_tiny")
    plan, pruned, total = exact_masks(model, 0.6)
    assert plan.sparsity() == pruned / total
    assert plan.layer_sparsity()["linear.weight"] == math.floor(0.6 * 640) / 640
    json.dumps(plan.to_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    attach_masks(model, plan)
    assert has_masks(model) and model.prunelab.masks is plan
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, *SHAPE)), torch.randint(0, 10, (4,))).backward()
        opt.step()
    model(torch.randn(1, *SHAPE))
    conv = model.layer2[0].conv1
    mask = plan.masks["layer2.0.conv1.weight"]
    assert torch.all(conv.weight[~mask] == 0) and torch.all(conv.weight[mask] != 0)
    assert torch.all(conv.parametrizations.weight.original.grad[~mask] == 0)
    assert sparsity(model) == pytest.approx(plan.sparsity(), abs=1e-12)

    fold_masks(model)
    assert not has_masks(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    assert isinstance(model.layer2[0].conv1.weight, nn.Parameter)
    assert sparsity(model) == pytest.approx(plan.sparsity(), abs=1e-12)

    plan.save(tmp_path / "masks.pt")
    payload = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert payload["masks"]["linear.weight"].dtype == torch.bool
    loaded = MaskPlan.load(tmp_path / "masks.pt")
    assert all(torch.equal(loaded.masks[k], plan.masks[k]) for k in plan.masks)


def test_reattached_masks_can_grow_back_and_zero_masked() -> None:
    model = build("vgg_tiny")
    original = model.classifier.weight.detach().clone()
    sparse, _, _ = exact_masks(model, 0.5)
    attach_masks(model, sparse)
    dense = MaskPlan({k: torch.ones_like(v) for k, v in sparse.masks.items()})
    attach_masks(model, dense)
    assert torch.equal(model.classifier.weight, original)
    assert model.prunelab.masks is dense
    fold_masks(model)

    zero_masked_(model, sparse)
    assert not has_masks(model)
    assert sparsity(model) == pytest.approx(sparse.sparsity(), abs=1e-12)
    assert torch.equal(
        model.classifier.weight[sparse.masks["classifier.weight"]], original[sparse.masks["classifier.weight"]]
    )


def test_reinitialize_follows_pruned_fans() -> None:
    model = build("resnet_tiny")
    plan = ChannelPlan(
        {"layer3.0.conv1": list(range(16)), "layer2.0.conv2": list(range(8))},
        {"layer3.0.conv1": 64, "layer2.0.conv2": 32},
    )
    apply_channel_plan(model, plan, SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    reinitialize(model)
    after = model.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert not torch.equal(before["layer3.0.conv2.weight"], after["layer3.0.conv2.weight"])
    # Kaiming-normal (fan_in) as in the reference: std = sqrt(2 / (in_channels * 9)) with the NEW fan.
    weight = model.layer3[0].conv2.weight
    assert weight.shape == (64, 16, 3, 3)
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.05)
    assert model.layer3[0].conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (8 * 9)), rel=0.08)


def test_reinitialize_without_init_weights_and_with_masks() -> None:
    model = build("concat")
    before = model.conv_a.weight.detach().clone()
    reinitialize(model)
    assert not torch.equal(before, model.conv_a.weight)

    masked = build("vgg_tiny")
    plan, _, _ = exact_masks(masked, 0.5)
    attach_masks(masked, plan)
    old = masked.features[0].parametrizations.weight.original.detach().clone()
    reinitialize(masked)
    assert has_masks(masked) and masked.prunelab.masks is plan
    assert not torch.equal(old, masked.features[0].parametrizations.weight.original)
    assert sparsity(masked) == pytest.approx(plan.sparsity(), abs=1e-12)

    # Masks kept only in the record (a pruned model between stages): the new weights are zero where they mask.
    recorded = build("vgg_tiny")
    plan, _, _ = exact_masks(recorded, 0.5)
    zero_masked_(recorded, plan)
    recorded.prunelab.masks = plan
    old = recorded.features[0].weight.detach().clone()
    reinitialize(recorded)
    assert not has_masks(recorded) and recorded.prunelab.masks is plan
    assert not torch.equal(old, recorded.features[0].weight)
    assert sparsity(recorded) == pytest.approx(plan.sparsity(), abs=1e-12)


class Bottleneck(nn.Module):
    """ResNeXt's block: 1x1 reduce, grouped 3x3, 1x1 expand, plus a residual (projected when shapes change)."""

    def __init__(self, in_planes: int, width: int, planes: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class TinyResNeXt(nn.Module):
    """Two blocks with groups=4 (4 channels per group), then one with groups=2 (12 per group)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Bottleneck(16, 16, 32, groups=4), Bottleneck(32, 16, 32, groups=4))
        self.layer2 = nn.Sequential(Bottleneck(32, 24, 64, groups=2, stride=2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnext() -> TinyResNeXt:
    torch.manual_seed(0)
    model = TinyResNeXt()
    randomize_bn(model)
    return model.eval()


def l1_scores(model: nn.Module, groups: list) -> dict[str, torch.Tensor]:
    """Per-channel L1 norms summed over every layer producing the channels (l1_filter's scores)."""
    return {g.name: sum(w.detach().abs().flatten(1).sum(1) for w in group_weights(model, g)) for g in groups}


def whole_units(kept: list[int], unit: int) -> bool:
    """Whether the kept indices hold every channel of each unit they touch."""
    return all(set(range(i - i % unit, i - i % unit + unit)) <= set(kept) for i in kept)


# Grouped convolution name -> the channel group feeding it, and its channels per group.
TINY_GROUPED = {
    "layer1.0.conv2": ("layer1.0.conv1", 4),
    "layer1.1.conv2": ("layer1.1.conv1", 4),
    "layer2.0.conv2": ("layer2.0.conv1", 12),
}


def test_grouped_convolutions_join_the_group_feeding_them() -> None:
    groups = {g.name: g for g in channel_groups(tiny_resnext(), SHAPE)}
    for conv, (name, unit) in TINY_GROUPED.items():
        assert (groups[name].layers, groups[name].unit, groups[name].coupled) == ([name, conv], unit, False)
        assert conv not in groups
    assert groups["layer1.0.conv1"].norms == ["layer1.0.bn1", "layer1.0.bn2"]
    assert all(g.unit == 1 for n, g in groups.items() if n not in {v[0] for v in TINY_GROUPED.values()})


def test_grouped_convolutions_lose_whole_groups_to_a_flops_budget() -> None:
    model = tiny_resnext()
    dense = copy.deepcopy(model)
    groups = channel_groups(model, SHAPE)
    plan, ratio = search_threshold(model, l1_scores(model, groups), 0.5, SHAPE, tolerance=0.05)
    assert abs(ratio - 0.5) <= 0.05 * 0.5
    apply_channel_plan(model, plan, SHAPE)

    assert count_flops(model, SHAPE) / count_flops(dense, SHAPE) == pytest.approx(ratio, abs=1e-12)
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    removed = 0
    for conv, (name, unit) in TINY_GROUPED.items():
        kept = plan.keep[name]
        assert whole_units(kept, unit), (name, kept)
        pruned, original = model.get_submodule(conv), dense.get_submodule(conv)
        assert pruned.groups == len(kept) // unit and pruned.in_channels == pruned.out_channels == len(kept)
        removed += original.groups - pruned.groups
    assert removed > 0
    # The kept channels of a grouped convolution are computed by the same weights, group by group.
    kept = plan.keep["layer1.0.conv1"]
    x = torch.randn(2, 16, 8, 8)
    before, after = dense.layer1[0].conv2, model.layer1[0].conv2
    assert torch.equal(after.weight, before.weight[kept])
    with torch.no_grad():
        assert torch.allclose(after(x[:, kept]), before(x)[:, kept], atol=1e-6)
    # The pruned model's groups follow the smaller convolutions (one left with a single group is dense).
    after_groups = {g.name: g for g in channel_groups(model, SHAPE)}
    for conv, (name, unit) in TINY_GROUPED.items():
        if model.get_submodule(conv).groups > 1:
            assert (after_groups[name].size, after_groups[name].unit) == (len(plan.keep[name]), unit)


def test_removing_dead_groups_of_grouped_convolutions_changes_nothing() -> None:
    model = tiny_resnext()
    # Channels 4-7 (group 1 of layer1.0.conv2) and 0-11 (group 0 of layer2.0.conv2) output zeros.
    removed = {"layer1.0.conv1": list(range(4, 8)), "layer2.0.conv1": list(range(12))}
    for name, channels in removed.items():
        block = model.get_submodule(name.rsplit(".", 1)[0])
        for bn in (block.bn1, block.bn2):
            bn.weight.data[channels] = 0.0
            bn.bias.data[channels] = 0.0
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected = model(x)
    sizes = {"layer1.0.conv1": 16, "layer2.0.conv1": 24}
    keep = {n: [i for i in range(sizes[n]) if i not in chans] for n, chans in removed.items()}
    apply_channel_plan(model, ChannelPlan(keep, sizes), SHAPE)
    assert (model.layer1[0].conv2.groups, model.layer2[0].conv2.groups) == (3, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_plans_keep_whole_units_and_splitting_one_is_refused() -> None:
    assert keep_count(5, 16, unit=4) == 8 and keep_count(0, 16, unit=4) == 4
    assert keep_count(9, 24, round_to=8, unit=12) == 24 and keep_count(9, 64, round_to=8, unit=1) == 16
    scores = {"a": torch.tensor([0.9, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]), "b": torch.arange(4.0)}
    plan = plan_by_counts(scores, {"a": 3, "b": 2}, {"a": 4})
    # Units rank by their mean score (0.225, 0.5, 0.1), and 3 channels round up to one unit.
    assert plan.keep == {"a": [4, 5, 6, 7], "b": [2, 3]}

    model = tiny_resnext()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    split = ChannelPlan({"layer1.0.conv1": [0, 1, 2, 3, 4, 5]}, {"layer1.0.conv1": 16})
    with pytest.raises(ValueError, match=r"splits a unit of group 'layer1.0.conv1'.*layer1.0.conv2.*units of 4.*4-7"):
        apply_channel_plan(model, split, SHAPE)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model_record(model).plans == []


class SplitGroups(nn.Module):
    """A grouped convolution whose output groups are wider than its input groups (8 -> 16, groups=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.widen = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.widen(F.relu(self.bn0(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv(x))), 1), 1))


class ConcatGroups(nn.Module):
    """A grouped convolution (groups of 4) over a concatenation of 6 + 6 + 8 channels: its second group
    takes channels from both `a` and `b`, while `c`'s channels fill its last two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.mix = nn.Conv2d(20, 20, 3, padding=1, groups=5, bias=False)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.cat([self.a(x), self.b(x), self.c(x)], 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


KEPT_WHOLE = [
    # Its own outputs lose as many channels in each of its groups (equal blocks); its input stays whole.
    (SplitGroups, ["widen", "conv"], "group 'stem' is kept whole: it passes through the grouped convolution 'widen' "
     "(groups=2, 8 -> 16 channels), and its input and output groups differ in size"),
    (ConcatGroups, ["c"], "group 'b' is kept whole: it passes through the grouped convolution 'mix' "
     "(groups=5, 20 -> 20 channels), and its groups do not line up with blocks of 4"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "names", "message"), KEPT_WHOLE, ids=[c[0].__name__ for c in KEPT_WHOLE])
def test_grouped_convolution_without_whole_groups_is_kept_whole(caplog, cls: type, names: list, message: str) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    with caplog.at_level(logging.WARNING, logger="prunelab"):
        groups = channel_groups(model, SHAPE)
    assert [g.name for g in groups] == names
    assert message in caplog.text
    dense = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    scores = {g.name: torch.rand(g.size) for g in groups}
    plan = plan_by_counts(
        scores,
        {g.name: g.size // 2 for g in groups},
        {g.name: g.unit for g in groups},
        {g.name: g.blocks for g in groups},
    )
    apply_channel_plan(model, plan, SHAPE)
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    # Only the prunable group's producers lost output channels.
    shrunk = [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.shape[0] < dense[name][0]
    ]
    assert shrunk == [layer for g in groups for layer in g.layers]


def test_torchvision_resnext50_prunes_by_whole_groups_and_round_trips(tmp_path) -> None:
    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = create("torchvision:resnext50_32x4d", num_classes=10).eval()
    model.prunelab.input_shape = shape
    dense_flops = count_flops(model, shape)
    groups = channel_groups(model, shape)
    grouped = {g.name: g for g in groups if g.unit > 1}
    assert len(grouped) == 16 and grouped["layer1.0.conv1"].layers == ["layer1.0.conv1", "layer1.0.conv2"]
    assert {(g.size // g.unit) for g in grouped.values()} == {32}
    plan = plan_by_counts(
        l1_scores(model, groups), {g.name: g.size // 2 for g in groups}, {g.name: g.unit for g in groups}
    )
    apply_channel_plan(model, plan, shape)
    assert count_flops(model, shape) < 0.5 * dense_flops
    for name, group in grouped.items():
        conv = model.get_submodule(group.layers[1])
        assert whole_units(plan.keep[name], group.unit) and conv.groups == 16 and conv.out_channels == group.size // 2

    randomize_bn(model)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x)
    loaded = load_model(save_model(model, tmp_path / "model.pt")).eval()
    assert [m.groups for m in loaded.modules() if isinstance(m, nn.Conv2d)] == [
        m.groups for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize(
    "name",
    ["timm:resnext26ts", pytest.param("torchvision:resnext50_32x4d", marks=pytest.mark.slow)],
)
def test_resnext_prunes_through_the_pipeline(tmp_path, name: str) -> None:
    backbone = name.split(":")[0]
    cfg = make_cfg(
        tmp_path,
        f"backbone={backbone}",
        f"backbone.name={name}",
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.05",
        "dataset.image_size=64",
        "latency.batch_sizes=[]",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    summary = pipeline.run(cfg, tmp_path)
    assert abs(summary["model/flops_ratio"] - 0.5) <= 0.05 * 0.5
    model = load_model(tmp_path / "model.pt").eval()
    assert count_flops(model, (3, 64, 64)) == summary["model/flops"]
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), torch.jit.load(str(tmp_path / "model.ts"))(x), atol=1e-5)


def test_a_resumed_run_reads_its_groups_from_the_run_directory(tmp_path, monkeypatch):
    """The first run traces and checks the model; running the same command again traces neither for them."""
    import prunelab.structure.groups as groups_module
    import prunelab.structure.surgery as surgery_module

    overrides = ("method=l1_filter", "budget.flops=0.6", "budget.tolerance=0.05", "test=false")
    pipeline.run(make_cfg(tmp_path, *overrides), tmp_path)
    saved = json.loads((tmp_path / "groups.json").read_text())
    assert saved["checked"] and [g["name"] for g in saved["groups"]] == [
        g.name for g in channel_groups(create("resnet_tiny"), SHAPE)
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("the model was checked again")

    monkeypatch.setattr(surgery_module, "check_prunable", refuse)
    monkeypatch.setattr("prunelab.structure.check_prunable", refuse)
    traced = []
    original = groups_module.build_graph
    monkeypatch.setattr(groups_module, "build_graph", lambda *a, **k: traced.append(1) or original(*a, **k))
    model = create("resnet_tiny")
    model_record(model).input_shape = SHAPE
    assert groups_module.remember_groups(model, SHAPE, tmp_path / "groups.json")
    assert [g.name for g in channel_groups(model, SHAPE)] == [g["name"] for g in saved["groups"]] and traced == []
    pipeline.run(make_cfg(tmp_path, *overrides), tmp_path)  # a finished run, resumed: nothing checked again
    model.conv1.keep_whole = True  # as another prunelab would decide at creation: the saved groups are not used
    assert not groups_module.remember_groups(model, SHAPE, tmp_path / "groups.json") and traced == [1]
