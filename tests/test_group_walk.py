"""Where Torch-Pruning cannot follow a group's channels (structure/tp_graph.py's bounded walk and guarded index
mappings): the walk is stopped before it runs away, the group is kept whole with one reason, and the rest prunes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHAPE,
    conv_bn,
    pruned_and_reloaded,
    register_backbones,
)
from torch import nn

from prunelab.backbones import create
from prunelab.structure import (
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
            "test_concatenated": Concatenated,
            "test_botnet": BottleneckAttention,
        },
    )


class Concatenated(nn.Module):
    """Two branches of a stem concatenated and fused: DenseNet's pattern, the smallest model with a concatenation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a, self.b = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1)
        self.fuse = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3)))


def test_a_concatenation_torch_pruning_cannot_map_is_kept_whole_with_a_reason(tmp_path, caplog, monkeypatch):
    """Torch-Pruning's shape inference of a concatenation can raise (Gemma 4's ViT: an IndexError): its parts
    are kept whole, said once, and the rest of the model prunes; without the guard group discovery crashes."""
    from torch_pruning.dependency import index_mapping

    def fails(graph, node):
        raise IndexError("list index out of range")

    monkeypatch.setattr(index_mapping, "update_concat_index_mapping", fails)
    torch.manual_seed(0)
    model = create("test_concatenated").eval()
    with caplog.at_level("WARNING", logger="prunelab"):
        groups = channel_groups(model, SHAPE)
    assert sorted(g.name for g in groups) == ["fuse.2", "stem.0"]
    assert (
        "groups 'a' and 'b' are kept whole: Torch-Pruning cannot follow their channels (IndexError in Torch-Pruning's "
        in caplog.text
    )
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.a.out_channels == 6 and model.b.out_channels == 6 and model.stem[0].out_channels < 8


def test_a_group_kept_whole_anyway_gets_no_second_reason_when_its_walk_fails(caplog, monkeypatch):
    """EfficientViT-M's cascaded attentions, kept whole at creation, also logged 'Torch-Pruning cannot follow their
    channels' (their walks expand at a flatten): three lines that said nothing new. So for a layer in
    `structure.skip`."""
    import prunelab.structure.tp_graph as tp_graph

    monkeypatch.setattr(tp_graph, "walk_limit", lambda model: 8)  # the walk of 4 channels into a 2x2 flatten fails
    for whole in ("keep_whole", "skip", None):
        model = nn.Sequential(
            conv_bn(3, 8), conv_bn(8, 4), nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(16, 10)
        ).eval()
        if whole == "keep_whole":
            model[1][0].keep_whole = True
        elif whole == "skip":
            model_record(model).skip = ["1.0"]
        caplog.clear()
        with caplog.at_level("WARNING", logger="prunelab"):
            assert [g.name for g in channel_groups(model, SHAPE)] == ["0.0"]
        said = "channel group '1.0' is kept whole: Torch-Pruning cannot follow its channels (RuntimeError: its channel"
        assert (said in caplog.text) == (whole is None), (whole, caplog.text)


class TwiceConcatenated(Concatenated):
    """Concatenated, then a second concatenation of two branches of the fused output."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.fuse2 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.a(x := self.stem(x)), self.b(x)], dim=1))
        return self.fc(self.fuse2(torch.cat([self.c(x), self.d(x)], dim=1)).mean((2, 3)))


def test_one_reason_met_at_several_concatenations_is_said_in_one_line(caplog, monkeypatch):
    """Torch-Pruning names each operation with a running number (Gemma 4's ViT: one failing concatenation per block):
    the reason is said once for all of them, not once per concatenation."""
    from torch_pruning.dependency import index_mapping

    def fails(graph, node):
        raise IndexError("list index out of range")

    monkeypatch.setattr(index_mapping, "update_concat_index_mapping", fails)
    with caplog.at_level("WARNING", logger="prunelab"):
        groups = channel_groups(TwiceConcatenated().eval(), SHAPE)
    assert sorted(g.name for g in groups) == ["fuse.2", "fuse2.2", "stem.0"]
    lines = [r.getMessage() for r in caplog.records if "cannot follow" in r.getMessage()]
    assert lines == [
        "channel groups 'a', 'b' and 2 more are kept whole: Torch-Pruning cannot follow their channels "
        "(IndexError in Torch-Pruning's index mapping of _ConcatOp)"
    ]


class BottleneckAttention(nn.Module):
    """timm's BoTNet block: self-attention over a feature map with relative position logits (reshapes, pads and
    slices of the token axes around the products)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.layers.bottleneck_attn import BottleneckAttn

        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3)
        self.attn = BottleneckAttn(16, 16, feat_size=(8, 8), num_heads=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(F.avg_pool2d(self.stem(x), 4)).mean((2, 3)))


def test_a_group_walk_ends_where_its_channels_cannot_be_followed(tmp_path, caplog):
    """Past the view that merges an attention's heads into the batch, Torch-Pruning's flatten mappings round the
    relative-position products multiplied the indices without end (timm's BoTNet ran out of memory finding its
    groups): the walk now ends there, that group is kept whole with the reason, and the rest prunes."""
    torch.manual_seed(0)
    model = create("test_botnet").eval()
    assert [g.name for g in channel_groups(model, SHAPE)] == ["stem.0"]
    assert "channel group 'attn.qkv' is kept whole" in caplog.text and "splits or merges channels" in caplog.text
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.attn.qkv.in_channels == 8


def test_a_group_walk_that_keeps_reaching_a_node_with_new_channels_is_stopped():
    """Torch-Pruning's walk of a group adds a node again whenever it arrives with other indices: round a cycle of views,
    an expansion and a batched product (timm's lambda layers) that never settles, group discovery ran past 5 minutes
    (lambda_resnet26t, focalnet_tiny_srf). A node reached more than WALK_REVISITS times ends the walk with the reason,
    and the group is kept whole."""
    from prunelab.structure.tp_graph import WALK_REVISITS, BoundedGroup

    node = type("Node", (), {"name": "_Reshape_7"})()
    dep, group = type("Dep", (), {"target": node})(), BoundedGroup(100)
    for i in range(WALK_REVISITS):
        group.add_dep(dep, [i])
    with pytest.raises(RuntimeError, match="goes round _Reshape_7 without settling"):
        group.add_dep(dep, [WALK_REVISITS])
    assert len(group) == WALK_REVISITS
    BoundedGroup(100).add_dep(dep, [0])  # each walk counts its own arrivals
    with pytest.raises(RuntimeError, match="expands to"):  # flatten mappings multiplying the indices
        BoundedGroup(100).add_dep(dep, list(range(101)))


def test_a_flatten_is_stopped_before_it_builds_more_indices_than_any_layer_has():
    """The bound on a step's indices is twice the model's widest layer (VGG's flatten into its classifier passes), and
    a flatten mapping is checked before it builds its list: round EfficientViT-M's attention views a flatten built
    lists of 944,784 indices again and again (group discovery 37.5 s)."""
    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    from prunelab.structure.tp_graph import WALK_MIN_INDICES, BoundedGroup, walk_limit

    assert walk_limit(create("vgg_tiny")) == WALK_MIN_INDICES
    assert walk_limit(nn.Sequential(nn.Conv2d(3, 512, 1), nn.Flatten(), nn.Linear(512 * 7 * 7, 10))) == 2 * 25088
    calls = []

    class Flatten(_FlattenIndexMapping):
        def __call__(self, idxs):
            calls.append(len(idxs))
            return super().__call__(idxs)

    dep = type("Dep", (), {"index_mapping": [Flatten(stride=49), None]})()
    idxs = [_HybridIndex(i, i) for i in range(3)]
    assert len(BoundedGroup(147).carry(dep, idxs)) == 147
    with pytest.raises(RuntimeError, match="expands to 196 indices at a flatten"):
        BoundedGroup(147).carry(dep, [*idxs, _HybridIndex(3, 3)])
    assert calls == [3]  # the stopped one never ran
