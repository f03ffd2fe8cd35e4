"""Splits, slices, concatenations and reshapes of channels (structure/reshapes.py) in models beyond prunelab's own
backbones: each part follows the channels it holds, the sizes a module records follow the plan, and what Torch-Pruning
cannot follow is kept whole with a reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHAPE,
    conv_bn,
    equals_silenced_dense_and_reloads,
    pruned_and_reloaded,
    random_norms,
    register_backbones,
    silence,
)
from torch import nn

from prunelab import load_model
from prunelab.backbones import create
from prunelab.budget import CostModel, count_flops, count_params
from prunelab.export import save_model
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
            "test_ghost": Ghost,
            "test_ghost_residual": GhostResidual,
            "test_mixed": Mixed,
            "test_shuffled": Shuffled,
            "test_split": Split,
            "test_gated_tokens": GatedTokens,
            "test_gated_sections": GatedSections,
            "test_position_map": PositionMap,
            "test_rex": Rex,
            "test_sections": Sections,
            "test_tiny_mixer": _tiny_mixer,
            "test_tiny_resmlp": lambda **kw: _tiny_mixer(resmlp=True, **kw),
        },
    )


class GhostModule(nn.Module):
    """GhostNet's module: a primary convolution's channels x and a depthwise copy of them, cat([x, cheap(x)])."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out_chs = cout
        self.primary = nn.Sequential(nn.Conv2d(cin, cout // 2, 1, bias=False), nn.BatchNorm2d(cout // 2), nn.ReLU())
        self.cheap = nn.Sequential(
            nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2, bias=False), nn.BatchNorm2d(cout // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.primary(x)
        return torch.cat([x, self.cheap(x)], 1)[:, : self.out_chs]


class Ghost(nn.Module):
    """A ghost bottleneck: ghost module, depthwise conv and squeeze-excitation over the concatenation,
    ghost module, and a convolutional shortcut added to the second concatenation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.ghost1 = GhostModule(8, 24)
        self.conv_dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.bn_dw = nn.BatchNorm2d(24)
        self.se_reduce, self.se_expand = nn.Conv2d(24, 6, 1), nn.Conv2d(6, 24, 1)
        self.ghost2 = GhostModule(24, 16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn_dw(self.conv_dw(self.ghost1(x)))
        y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self.ghost2(y) + self.shortcut(x)
        return self.fc(y.mean((2, 3)))


def test_a_concatenation_that_holds_each_channel_twice_prunes_both_copies(tmp_path):
    """GhostNet: each primary channel is held twice by the depthwise conv, the SE expansion and the shortcut
    after the concatenation; removing it removes both copies (the trial checks against the silenced dense model)."""
    torch.manual_seed(0)
    model = create("test_ghost").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    ghost1 = groups["ghost1.primary.0"]
    assert ghost1.rows["conv_dw"] == [[i, 12 + i] for i in range(12)]
    assert ghost1.rows["se_expand"] == [[i, 12 + i] for i in range(12)]
    check_prunable(model, SHAPE)
    costs = CostModel(model, list(groups.values()), SHAPE)
    plan = ChannelPlan({"ghost1.primary.0": list(range(0, 12, 2))}, {"ghost1.primary.0": 12})
    pruned = apply_channel_plan(copy.deepcopy(model), plan, SHAPE)
    assert costs.count(plan)["flops"] == count_flops(pruned, SHAPE)  # both copies counted
    pruned_and_reloaded(copy.deepcopy(model), SHAPE, 0.6, tmp_path / "flops")
    pruned_and_reloaded(model, SHAPE, None, tmp_path / "half")
    assert model.conv_dw.out_channels == model.se_expand.out_channels == 2 * model.ghost1.primary[0].out_channels == 12


def _tiny_mixer(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, resmlp: bool = False) -> nn.Module:
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    blocks = dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4) if resmlp else {}
    return MlpMixer(num_classes, img_size=32, patch_size=8, num_blocks=2, embed_dim=32, **blocks)


@pytest.mark.parametrize(
    ("name", "mlps"), [("test_tiny_mixer", ["mlp_tokens", "mlp_channels"]), ("test_tiny_resmlp", ["mlp_channels"])]
)
def test_token_mixing_mlps_keep_the_stream_whole_and_prune_their_hidden_width(tmp_path, name, mlps, caplog):
    """MLP-Mixer and ResMLP mix tokens with Linear layers on the transposed stream: Torch-Pruning maps the
    stream's channels onto their token inputs, so the stream is kept whole (with the reason) and the
    channel and token MLPs' hidden widths prune."""
    torch.manual_seed(0)
    model = create(name).eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    assert "stem.proj" not in groups and "it reads another axis" in caplog.text
    assert list(groups) == [f"blocks.{i}.{mlp}.fc1" for i in (0, 1) for mlp in mlps]
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, 0.6, tmp_path)
    assert model.stem.proj.out_channels == 32


class Mixed(nn.Module):
    """MixNet's mixed convolutions (timm's MixedConv2d): the input split among convolutions by recorded sizes,
    pointwise in two parts, depthwise in three (chunks that do not line up with the two before), concatenated."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.layers import MixedConv2d

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.pw = nn.Sequential(MixedConv2d(12, 24, [1, 1]), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(MixedConv2d(24, 24, [3, 5, 7], depthwise=True), nn.BatchNorm2d(24), nn.ReLU())
        self.pwl = nn.Sequential(MixedConv2d(24, 16, [1, 1]), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pwl(self.dw(self.pw(self.stem(x)))).mean((2, 3)))


class GhostResidual(nn.Module):
    """Two ghost modules added to the stem's channels: stem channel k and k+8 meet primary channel k and its copy."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand, self.project = GhostModule(16, 24), GhostModule(24, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc((x + self.project(self.expand(x))).mean((2, 3)))


def test_channels_tied_to_their_ghost_copies_lose_the_same_position_in_each_half(tmp_path):
    """Stem channel k and k+8 meet the project module's primary channel k and its cheap copy: removing one removes the
    other, so the stem's two halves are tied blocks that keep the same positions (they were kept whole before)."""
    torch.manual_seed(0)
    model = random_norms(create("test_ghost_residual").eval())
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    stem = groups["stem.0"]
    assert (stem.size, stem.blocks, stem.tied) == (16, 2, [0, 1]) and stem.layers == [
        "stem.0",
        "project.primary.0",
        "project.cheap.0",
    ]
    check_prunable(model, SHAPE)  # the trial removes the same positions of both halves
    with pytest.raises(ValueError, match=r"keeps other positions in blocks \[0, 1\] of group 'stem.0'"):
        apply_channel_plan(copy.deepcopy(model), ChannelPlan({"stem.0": [0, 1, 2, 8, 9, 11]}, {"stem.0": 16}), SHAPE)

    dense, keep = copy.deepcopy(model), [1, 2, 6, 9, 10, 14]
    costs = CostModel(model, list(groups.values()), SHAPE)
    apply_channel_plan(model, ChannelPlan({"stem.0": keep}, {"stem.0": 16}), SHAPE)
    assert model.stem[0].out_channels == 6 and model.project.primary[0].out_channels == 3
    assert costs.count(ChannelPlan({"stem.0": keep}, {"stem.0": 16})) == {
        "flops": count_flops(model, SHAPE),
        "params": count_params(model),
    }
    equals_silenced_dense_and_reloads(model, silence(dense, groups, {"stem.0": keep}), tmp_path)

    # Plans score each position by its mean over the halves (`tie_scores`) and keep the same positions in both.
    model = create("test_ghost_residual").eval()
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.stem[0].out_channels == 2 * model.project.primary[0].out_channels == 8
    pruned_and_reloaded(create("test_ghost_residual").eval(), SHAPE, 0.6, tmp_path)


def test_mixed_convolutions_split_their_input_in_the_chunks_they_read(tmp_path):
    """Each part of a split goes to the convolution that reads it (Torch-Pruning alone swaps them), chunk sizes
    follow the layers as groups are removed one after another, and the recorded split sizes take the new widths."""
    torch.manual_seed(0)
    model = create("test_mixed").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    assert groups["pw.0.0"].consumers == ["pwl.0.0"] and groups["pw.0.1"].consumers == ["pwl.0.1"]
    check_prunable(model, SHAPE)  # against the dense model with the removed channels silenced
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.dw[0].splits == [c.in_channels for c in model.dw[0].values()] and all(model.dw[0].splits)
    assert sum(model.dw[0].splits) == model.pw[0].out_channels == model.pwl[0].in_channels < 24

    # A plan that empties a part (pw.0.0's channels 0-7 are all the first depthwise part holds) keeps one of them.
    model = create("test_mixed").eval()
    plan = ChannelPlan({"pw.0.0": [8, 9, 10, 11]}, {"pw.0.0": 12})
    apply_channel_plan(model, plan, SHAPE)
    assert model.dw[0].splits == [1, 8, 8] and model_record(model).plans[-1].keep["pw.0.0"] == [0, 8, 9, 10, 11]
    model_record(model).input_shape = SHAPE
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_model(save_model(model, tmp_path / "parts.pt")).eval()(x), model(x))


class Shuffled(nn.Module):
    """ShuffleNet's channel shuffle between two convolutions, and a branch of its own after it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.branch = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(F.relu(self.branch(x)).mean((2, 3)))


def test_channel_shuffle_is_kept_whole_with_a_reason_and_the_rest_prunes(tmp_path, caplog):
    """The shuffle's views split and merge the channel dimension: Torch-Pruning would map them wrongly, so
    the shuffled channels are kept whole, said once, and the other groups prune to the same function."""
    torch.manual_seed(0)
    model = create("test_shuffled").eval()
    with caplog.at_level("WARNING", logger="prunelab"):
        groups = channel_groups(model, SHAPE)
    assert [g.name for g in groups] == ["branch.0", "branch.3"]
    assert (
        "channel group 'conv1' is kept whole: Torch-Pruning cannot follow its channels (a reshape from " in caplog.text
    )
    check_prunable(model, SHAPE)  # also compares the pruned outputs with the dense model's, channels silenced
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.conv1.out_channels == 8 and model.branch[0].out_channels == 6


class CrossStage(nn.Module):
    """timm's CSPNet stage: the expanded channels split in two halves by a recorded width (`expand_chs`), one half
    through residual blocks and a transition, concatenated after the other half (traced second, placed first)."""

    def __init__(self, c_in: int, c_out: int, expand: int) -> None:
        super().__init__()
        self.expand_chs = expand
        self.conv_exp = conv_bn(c_in, expand)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn(expand // 2, 4), conv_bn(4, expand // 2, 3, act=False)) for _ in range(2)
        )
        self.conv_transition_b = conv_bn(expand // 2, expand // 2)
        self.conv_transition = conv_bn(expand, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        for block in self.blocks:
            xb = F.relu(xb + block(xb))
        return self.conv_transition(torch.cat([xs, self.conv_transition_b(xb)], dim=1))


class Res2Block(nn.Module):
    """timm's Res2Net bottleneck: the width split in `scale` chunks of a recorded `width`, each chunk added to the
    previous chunk's output before its convolution (the first block of a stage: not added, the last chunk pooled).
    `cardinality` > 1 makes the chunks' convolutions grouped (Res2NeXt)."""

    def __init__(self, channels: int, width: int, scale: int, first: bool, cardinality: int = 1) -> None:
        super().__init__()
        self.width, self.first = width, first
        self.conv1 = conv_bn(channels, width * scale)
        self.convs = nn.ModuleList(conv_bn(width, width, 3, groups=cardinality) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, 1, 1) if first else None
        self.conv3 = conv_bn(width * scale, channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(self.conv1(x), self.width, 1)
        out, sp = [], chunks[0]
        for i, conv in enumerate(self.convs):
            sp = conv(chunks[i] if i == 0 or self.first else sp + chunks[i])
            out.append(sp)
        out.append(self.pool(chunks[-1]) if self.pool is not None else chunks[-1])
        return F.relu(x + self.conv3(torch.cat(out, 1)))


class Split(nn.Module):
    """A CSP stage and two Res2Net blocks (a stage's first and a later one), between a stem and a classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 12, 3)
        self.csp = CrossStage(12, 16, 16)
        self.res2 = nn.Sequential(Res2Block(16, 6, 4, first=True), Res2Block(16, 6, 4, first=False))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.res2(self.csp(self.stem(x))).mean((2, 3)))


def test_equal_splits_keep_equal_chunks_and_their_recorded_width(tmp_path):
    """A split into equal chunks (`x.split(k)`) keeps the same count in each chunk, each its own best channels; the
    module's recorded width (CSP's `expand_chs`, Res2Net's `width`) takes the new size; a chunk's readers (several
    for one chunk, a concatenation traced out of order, a concatenation back to a chunk) get that chunk's channels."""
    torch.manual_seed(0)
    model = random_norms(create("test_split").eval())
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    csp, later = groups["csp.conv_exp.0"], groups["res2.1.conv1.0"]
    assert (csp.blocks, csp.split_sizes) == (2, [["csp", "expand_chs", 1]])
    assert csp.layers == ["csp.conv_exp.0", "csp.blocks.0.1.0", "csp.blocks.1.1.0"]  # the second half's residual stream
    assert groups["csp.conv_transition_b.0"].consumers == ["csp.conv_transition.0"]
    assert (later.blocks, later.split_sizes) == (4, [["res2.1", "width", 4]])
    assert later.layers == ["res2.1.conv1.0", "res2.1.convs.0.0", "res2.1.convs.1.0"]  # chunks 1, 2 meet their outputs
    assert groups["res2.0.conv1.0"].blocks == 4 and "res2.0.convs.0.0" in groups
    check_prunable(model, SHAPE)  # against the dense model with other channels removed in each chunk

    # Different channels in each chunk: the pruned model computes what the dense one does with them silenced.
    dense = copy.deepcopy(model)
    keep = {csp.name: [0, 3, 5, 8, 9, 14], later.name: [1, 4, 6, 9, 13, 14, 18, 22]}
    plan = ChannelPlan(keep, {name: groups[name].size for name in keep})
    apply_channel_plan(model, plan, SHAPE)
    assert (model.csp.expand_chs, model.res2[1].width) == (6, 2)
    equals_silenced_dense_and_reloads(model, silence(dense, groups, keep), tmp_path)

    with pytest.raises(ValueError, match=r"keeps \[3, 2\] channels of the 2 equal chunks of group 'csp.conv_exp.0'"):
        apply_channel_plan(create("test_split").eval(), ChannelPlan({csp.name: [0, 1, 2, 8, 9]}, {csp.name: 16}), SHAPE)
    model = create("test_split").eval()
    pruned_and_reloaded(model, SHAPE, 0.6, tmp_path)
    assert model.csp.expand_chs == model.csp.conv_exp[0].out_channels == 2 * model.csp.conv_transition_b[0].in_channels


def test_equal_chunks_through_grouped_convolutions_lose_whole_groups_of_each_chunk(tmp_path):
    """Res2NeXt's first block: each equal chunk of the width goes through a grouped convolution, so each chunk loses
    whole convolution groups, as many in every chunk (the check's trial plan too: it used to split a group)."""
    torch.manual_seed(0)
    model = random_norms(
        nn.Sequential(conv_bn(3, 8), Res2Block(8, 8, 4, first=True, cardinality=2), nn.Flatten(1)).eval()
    )
    shape = (3, 8, 8)
    group = {g.name: g for g in channel_groups(model, shape)}["1.conv1.0"]
    assert (group.size, group.blocks, group.unit) == (32, 4, 4)
    check_prunable(model, shape)
    dense = copy.deepcopy(model)
    keep = [0, 1, 2, 3, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 26, 27]  # a different group of 4 in each chunk
    apply_channel_plan(model, ChannelPlan({group.name: keep}, {group.name: 32}), shape)
    assert model[1].width == 4 and [c.groups for c in (model[1].convs[0][0], model[1].convs[2][0])] == [1, 1]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), silence(dense, {group.name: group}, {group.name: keep})(x), atol=1e-5)
    with pytest.raises(ValueError, match="splits a unit"):
        apply_channel_plan(
            copy.deepcopy(dense), ChannelPlan({group.name: [0, 1, 8, 9, 16, 17, 24, 25]}, {group.name: 32}), shape
        )


def test_chunks_added_through_grouped_convolutions_keep_the_same_groups(tmp_path):
    """Res2NeXt's later blocks: chunk i is added to the output of chunk i-1's grouped convolution, whose group j follows
    its input group j, so chunks 0-2 lose the same convolution groups (tied blocks); the last chunk, passed on alone,
    its own (kept whole before)."""
    torch.manual_seed(0)
    block = Res2Block(8, 8, 4, first=False, cardinality=2)
    model = random_norms(nn.Sequential(conv_bn(3, 8), block, nn.Flatten(1)).eval())
    shape = (3, 8, 8)
    group = {g.name: g for g in channel_groups(model, shape)}["1.conv1.0"]
    assert (group.size, group.blocks, group.unit, group.tied) == (32, 4, 4, [0, 1, 2])
    check_prunable(model, shape)
    dense = copy.deepcopy(model)
    keep = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 26, 27]  # group 1 of chunks 0-2, group 0 of chunk 3
    with pytest.raises(ValueError, match=r"keeps other positions in blocks \[0, 1, 2\]"):
        apply_channel_plan(
            copy.deepcopy(model), ChannelPlan({group.name: [0, 1, 2, 3, *keep[4:]]}, {group.name: 32}), shape
        )
    apply_channel_plan(model, ChannelPlan({group.name: keep}, {group.name: 32}), shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), silence(dense, {group.name: group}, {group.name: keep})(x), atol=1e-5)


class GatedTokens(nn.Module):
    """Tokens through timm's GluMlp (EVA-02's SwiGLU): one Linear's output cut by `chunk(2, dim=-1)`, halves
    multiplied."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.layers import GluMlp

        super().__init__()
        self.embed = nn.Conv2d(in_channels, 16, 8, stride=8)
        self.norm = nn.LayerNorm(16)
        self.mlp = GluMlp(16, 48, act_layer=nn.SiLU, gate_last=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc((x + self.mlp(self.norm(x))).mean(1))


def test_halves_of_a_gated_mlp_cut_on_the_last_dimension_lose_the_same_positions(tmp_path):
    """A split of the last dimension of tokens is a split of their channels (Torch-Pruning maps dim 1 only, and
    autograd keeps dim -1 as 2**64 - 1): the gate's and the value's halves are tied blocks, read once by fc2 (the
    group was kept whole: "fc2 would read 48 of its 24 inputs")."""
    torch.manual_seed(0)
    model = create("test_gated_tokens").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    fc1 = groups["mlp.fc1"]
    assert (fc1.size, fc1.blocks, fc1.tied, fc1.consumers, sum(fc1.reads["mlp.fc2"])) == (
        48,
        2,
        [0, 1],
        ["mlp.fc2"],
        24,
    )
    check_prunable(model, SHAPE)
    dense, keep = copy.deepcopy(model), [c + half for half in (0, 24) for c in range(0, 24, 3)]
    plan = ChannelPlan({"mlp.fc1": keep}, {"mlp.fc1": 48})
    costs = CostModel(model, list(groups.values()), SHAPE).count(plan)
    apply_channel_plan(model, plan, SHAPE)
    assert (model.mlp.fc1.out_features, model.mlp.fc2.in_features) == (16, 8)
    assert costs == {"flops": count_flops(model, SHAPE), "params": count_params(model)}
    equals_silenced_dense_and_reloads(model, silence(dense, groups, {"mlp.fc1": keep}), tmp_path)
    pruned_and_reloaded(create("test_gated_tokens").eval(), SHAPE, 0.6, tmp_path)


class GatedSections(nn.Module):
    """MambaOut's gated convolution block on a (B, H, W, C) map: fc1's output split into sections of recorded sizes
    (`split_indices`: gate, identity, convolved) on the last dimension, the gate multiplied with the other two."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.models.mambaout import GatedConvBlock

        super().__init__()
        self.stem = nn.Conv2d(in_channels, 12, 4, stride=4)
        self.block = GatedConvBlock(12, expansion_ratio=2, kernel_size=3, conv_ratio=0.5)
        self.head = nn.Linear(12, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.head(self.block(self.stem(x).permute(0, 2, 3, 1)))).mean((1, 2)))


def test_sections_of_the_last_dimension_keep_their_sizes_as_later_groups_are_removed(tmp_path):
    """The gate's section is tied to the identity and convolved ones it multiplies; the recorded sizes follow what the
    plan leaves each section, also while groups after it are removed (their walks map the split again: the sizes it
    fell back to were the traced ones, and MambaOut broke with "split_sizes=[128, 80, 48]" once every group went)."""
    torch.manual_seed(0)
    model = create("test_gated_sections").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    fc1 = groups["block.fc1"]
    assert (fc1.size, fc1.blocks, fc1.tied) == (48, 2, [0, 1]) and "head" in groups
    check_prunable(model, SHAPE)  # every group at once, the later ones after block.fc1
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert sum(model.block.split_indices[1:]) == model.block.split_indices[0] == model.block.fc1.out_features // 2 < 24
    assert model.block.split_indices[2] == model.block.conv.in_channels


class PositionMap(nn.Module):
    """Visformer's stem: a position embedding of shape (1, C, H, W) added to a convolution's channels-first maps."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, 12, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 12, 8, 8))
        self.conv = conv_bn(12, 16, 3)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.embed(x) + self.pos_embed).mean((2, 3)))


def test_a_position_map_added_to_channels_first_maps_loses_the_same_channels(tmp_path):
    """Torch-Pruning cuts a parameter no layer holds along its last dimension that is not 1 (the map's width here:
    Visformer failed with "size of tensor a (28) must match b (14) at dimension 3"); channels first, dim 1 follows."""
    torch.manual_seed(0)
    model = create("test_position_map").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    check_prunable(model, SHAPE)
    dense, keep = copy.deepcopy(model), [0, 3, 4, 7, 9, 10]
    apply_channel_plan(model, ChannelPlan({"embed": keep}, {"embed": 12}), SHAPE)
    assert model.pos_embed.shape == (1, 6, 8, 8) and model.conv[0].in_channels == 6
    with torch.no_grad():  # silenced: the removed channels' embedding rows and position maps zeroed
        dropped = [c for c in range(12) if c not in keep]
        dense.embed.weight[dropped], dense.embed.bias[dropped], dense.pos_embed[:, dropped] = 0, 0, 0
    equals_silenced_dense_and_reloads(model, dense.eval(), tmp_path)
    assert "embed" in groups


def test_a_chunk_of_a_view_of_the_last_dimension_is_not_a_channel_split():
    """timm's MaxViT chunks a view of qkv to (B, N, heads, 3 x head_dim) on its last dimension: that cuts a head's
    width, not the channels, so it is not mapped as a channel split (it was, once last-dimension splits were, and the
    check refused the attention; its qkv stays whole, as before)."""
    shape = (3, 64, 64)
    model = create(
        "timm:maxvit_tiny_rw_224", img_size=64, depths=(1, 1, 1, 1), embed_dim=(64, 64, 64, 64), stem_width=(8, 16)
    ).eval()
    groups = channel_groups(model, shape)
    assert not [g for g in groups if g.tied] and not [g for g in groups if g.name.endswith("attn.qkv")]  # kept whole
    check_prunable(model, shape)


class PartialResidual(nn.Module):
    """ReXNet's linear bottleneck: the input added to the first `in_channels` of a wider output, a slice bounded by
    a recorded width, concatenated with the new channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.in_channels = c_in
        self.conv_exp, self.conv_pwl = conv_bn(c_in, 2 * c_in), conv_bn(2 * c_in, c_out, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pwl(self.conv_exp(x))
        return torch.cat([y[:, 0 : self.in_channels] + x, y[:, self.in_channels :]], dim=1)


class Rex(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8, 3)
        self.blocks = nn.Sequential(PartialResidual(8, 12), PartialResidual(12, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_partial_residual_slice_follows_its_channels_and_its_recorded_bound(tmp_path):
    """cat([y[:, :c] + x, y[:, c:]]): the sliced part joins the input's group (Torch-Pruning alone sizes the slice as
    its whole input and maps the rest onto rows past the layer's end), and `c` takes the new bound."""
    torch.manual_seed(0)
    model = random_norms(create("test_rex").eval())
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    stem = groups["stem.0"]
    assert stem.layers == ["stem.0", "blocks.0.conv_pwl.0", "blocks.1.conv_pwl.0"]
    assert [sum(map(len, stem.rows[f"blocks.{i}.conv_pwl.0"])) for i in (0, 1)] == [8, 8]  # one row each, of 12 and 16
    check_prunable(model, SHAPE)
    dense = copy.deepcopy(model)
    keep = {"stem.0": [1, 2, 5, 6, 7]}
    apply_channel_plan(model, ChannelPlan(keep, {"stem.0": 8}), SHAPE)
    assert [b.in_channels for b in model.blocks] == [5, 9] and model.blocks[1].conv_pwl[0].out_channels == 13
    equals_silenced_dense_and_reloads(model, silence(dense, groups, keep), tmp_path)
    pruned_and_reloaded(create("test_rex").eval(), SHAPE, 0.6, tmp_path)


class PartialConv(nn.Module):
    """FasterNet's partial convolution: a split into two sections of sizes held one per attribute, the first
    convolved."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim_conv3, self.dim_untouched = dim // 4, dim - dim // 4
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class InceptionDepthwise(nn.Module):
    """InceptionNeXt's token mixer: a split into sections of sizes held in one tuple, three of them
    depthwise-convolved."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        gc = dim // 8
        self.dwconv_hw = nn.Conv2d(gc, gc, 3, padding=1, groups=gc)
        self.dwconv_w = nn.Conv2d(gc, gc, (1, 5), padding=(0, 2), groups=gc)
        self.dwconv_h = nn.Conv2d(gc, gc, (5, 1), padding=(2, 0), groups=gc)
        self.split_indexes = (dim - 3 * gc, gc, gc, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), 1)


class Sections(nn.Module):
    """A residual stream through a partial convolution and an inception token mixer, each followed by an MLP."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3)
        self.mix1, self.mlp1 = PartialConv(16), nn.Sequential(conv_bn(16, 24), conv_bn(24, 16, act=False))
        self.mix2, self.mlp2 = InceptionDepthwise(16), nn.Sequential(conv_bn(16, 24), conv_bn(24, 16, act=False))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mlp1(self.mix1(x))
        x = x + self.mlp2(self.mix2(x))
        return self.fc(x.mean((2, 3)))


def test_a_split_into_sections_of_recorded_sizes_takes_the_sizes_left(tmp_path):
    """`x.split([a, b])` with the sizes held by the module (FasterNet's `dim_conv3` / `dim_untouched`, InceptionNeXt's
    `split_indexes`): each section keeps what the plan leaves it and the attributes follow; a section read by no layer
    (passed to a concatenation) is sized as the rest (the sizes went back to the traced ones when several groups were
    removed, and the model failed with "split_with_sizes expects split_sizes to sum exactly to ...")."""
    torch.manual_seed(0)
    model = random_norms(create("test_sections").eval())
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    stream = groups["stem.0"]
    assert {"mix1.partial_conv3", "mix2.dwconv_hw", "mix2.dwconv_w", "mix2.dwconv_h"} <= set(stream.layers) | set(
        stream.consumers
    )
    check_prunable(model, SHAPE)  # BatchNorm only: against the dense model with the removed channels silenced
    dense = copy.deepcopy(model)
    keep = {"stem.0": [0, 2, 3, 5, 8, 9, 10, 12, 13, 15], "mix1.partial_conv3": [1, 2]}
    apply_channel_plan(model, ChannelPlan(keep, {name: groups[name].size for name in keep}), SHAPE)
    assert (model.mix1.dim_conv3, model.mix1.dim_untouched) == (3, 7) and model.mix2.split_indexes == (6, 1, 2, 1)
    equals_silenced_dense_and_reloads(model, silence(dense, groups, keep), tmp_path)
    pruned_and_reloaded(create("test_sections").eval(), SHAPE, 0.6, tmp_path)


def test_channels_made_positions_of_one_channel_end_a_group_walk():
    """ECA's `y.view(B, 1, C)` turns the channels into the positions of a one-channel signal for a Conv1d: no unflatten
    of features into channels. Torch-Pruning mapped it as one, each channel to C, and group discovery of eca_nfnet_l0
    took 50 s (0.5 s now)."""
    from prunelab.structure.reshapes import _splits_channels

    assert _splits_channels(torch.Size([1, 256]), torch.Size([1, 1, 256]))
    assert not _splits_channels(torch.Size([1, 256]), torch.Size([1, 16, 4, 4]))  # features unflattened into maps
