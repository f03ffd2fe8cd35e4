"""Layers of other libraries as channel groups see them (structure/layers.py): norms without a bias, over the
channels or of several groups, weight-standardised convolutions, a layer scale, an anti-aliasing blur and a grouped
convolution that widens its input lose the rows of the channels removed."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHAPE,
    conv_bn,
    equals_silenced_dense_and_reloads,
    pruned_and_reloaded,
    register_backbones,
    silence,
)
from torch import nn

from prunelab import load_model
from prunelab.backbones import create
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
            "test_layer_scaled": LayerScaled,
            "test_blurred": Blurred,
            "test_std_convs": StdConvs,
            "test_norm_no_bias": NormWithoutBias,
            "test_rms_normed": RmsNormed,
            "test_rms_vit": _rms_vit,
            "test_group_normed": GroupNormed,
            "test_expanding_grouped": ExpandingGrouped,
        },
    )


class Scale(nn.Module):
    """timm's metaformer layer scale: it reshapes its parameter with a shape it recorded at construction."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class LayerScaled(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1))
        self.scale = Scale(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.scale(self.mlp(x))
        return self.fc(x.mean((2, 3)))


def test_layer_scale_learns_its_new_width(tmp_path):
    model = create("test_layer_scaled").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        channel_groups(model, SHAPE)
    # Torch-Pruning's advice on the layer scale, a parameter no layer holds, is not for prunelab's users.
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    model = pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.scale.shape == (8, 1, 1) and model.stem.out_channels == 8


class Blurred(nn.Module):
    """TResNet's anti-aliased downsampling: timm's BlurPool2d made with one copy of its filter per channel."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        from timm.layers import BlurPool2d

        super().__init__()
        self.conv = conv_bn(in_channels, 16, 3)
        self.aa = BlurPool2d(channels=16)
        self.head = conv_bn(16, 32, 3)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.aa(self.conv(x))).mean((2, 3)))


def test_an_anti_aliasing_blur_with_a_filter_per_channel_follows_the_channels(tmp_path):
    """The blur's per-channel filter is a buffer no pruner cuts (TResNet was refused: "expected input to have 128
    channels, but got 64"): at creation it shares one filter, with the same outputs, and the channels it blurs prune."""
    torch.manual_seed(0)
    stock = Blurred().eval()
    model = create("test_blurred").eval()
    model.load_state_dict(stock.state_dict())
    assert model.aa.channels is None and model.aa.filt.shape[0] == 1
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x), stock(x))
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.conv[0].out_channels == 8


class StdConvs(nn.Module):
    """Two of timm's weight-standardised convolutions (NFNets' ScaledStdConv2d, with a gain per output channel)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        from timm.layers import ScaledStdConv2d

        self.conv1, self.conv2 = ScaledStdConv2d(in_channels, 8, 3, padding=1), ScaledStdConv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_a_convolution_with_a_gain_per_output_channel_loses_its_rows(tmp_path):
    """The gain of a weight-standardised convolution is cut with its rows (its standardisation failed with "weight
    should contain 8 elements not 4" and every NFNet was refused), and the weight's reshape inside the layer is no
    channel reshape (the input group was kept whole). A standardised reader re-standardises over the inputs it keeps,
    so check_prunable does not hold the model to the silenced dense one."""
    torch.manual_seed(0)
    model = create("test_std_convs").eval()
    with torch.no_grad():
        model.conv1.gain.uniform_(0.5, 1.5)
    assert [g.name for g in channel_groups(model, SHAPE)] == ["conv1", "conv2"]
    check_prunable(model, SHAPE)
    dense, keep = copy.deepcopy(model), {"conv1": [0, 2, 5, 7]}
    apply_channel_plan(model, ChannelPlan(keep, {"conv1": 8}), SHAPE)
    assert model.conv1.gain.shape == (4, 1, 1, 1) and model.conv2.weight.shape == (12, 4, 3, 3)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model.conv1(x), dense.conv1(x)[:, keep["conv1"]])
    model_record(model).input_shape = SHAPE
    reloaded = load_model(save_model(model, tmp_path / "model.pt")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


class NormWithoutBias(nn.Module):
    """A norm made without a bias (timm's GroupNorm1NoBias, PoolFormer v2) between two convolutions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        from timm.models.metaformer import GroupNorm1NoBias

        self.conv1, self.norm, self.conv2 = (
            nn.Conv2d(in_channels, 8, 3, padding=1),
            GroupNorm1NoBias(8),
            nn.Conv2d(8, 12, 3, padding=1),
        )
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.norm(self.conv1(x))))).mean((2, 3)))


def test_a_norm_without_a_bias_loses_its_weights_rows(tmp_path):
    """Torch-Pruning cut a norm's bias whenever it was affine: without one, it failed ("'NoneType' object has no
    attribute 'device'") and PoolFormer v2 was refused."""
    model = pruned_and_reloaded(create("test_norm_no_bias").eval(), SHAPE, None, tmp_path)
    assert model.norm.weight.shape == (4,) and model.norm.bias is None and model.conv2.in_channels == 4


class RmsNormed(nn.Module):
    """timm's RmsNorm2d (MobileNetV5), a norm over the channels that subclasses no torch norm, between two
    convolutions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        from timm.layers import RmsNorm2d

        self.conv1, self.norm, self.conv2 = (
            nn.Conv2d(in_channels, 8, 3, padding=1),
            RmsNorm2d(8),
            nn.Conv2d(8, 12, 3, padding=1),
        )
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv2(F.relu(self.norm(self.conv1(x)))))).mean((2, 3)))


def test_a_norm_over_channels_known_by_its_class_name_is_not_held_to_the_silenced_model(tmp_path):
    """Silencing a channel changes what a norm over the channels divides by, so the check compares a pruned copy with
    the dense model with the channels silenced only where no such norm is. timm's RmsNorm2d subclasses none of torch's:
    mobilenetv5_300m_enc was compared anyway, refused ("outputs differ"), and the search for the culprits ran past
    minutes."""
    torch.manual_seed(0)
    model = create("test_rms_normed").eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    check_prunable(model, SHAPE)
    model = pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert model.norm.weight.shape == (4,) and model.conv2.in_channels == 4


def _rms_vit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """A tiny timm ViT whose norms are timm's RmsNorm (as DeepSeek's and Gemma 4's vision encoders), with random
    weights."""
    from timm.layers import RmsNorm
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        norm_layer=RmsNorm,
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RmsNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def test_a_vit_with_rms_norms_keeps_its_embedding_and_prunes_it_when_asked(tmp_path):
    """timm's RmsNorm subclasses no torch norm: its weight was cut as a loose parameter and its `normalized_shape` kept,
    so the stream through it was not known as the embedding width and broke the norms (deepseek_vit_412m was
    refused)."""
    torch.manual_seed(0)
    model = create("test_rms_vit").eval()
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path / "default")
    assert model.patch_embed.proj.out_channels == 32 and model.blocks[1].mlp.fc1.out_features == 32

    model = create("test_rms_vit").eval()
    model_record(model).prune_embedding = True
    assert [g.name for g in channel_groups(model, SHAPE) if g.embedding] == ["patch_embed.proj"]
    check_prunable(model, SHAPE)
    pruned_and_reloaded(model, SHAPE, None, tmp_path / "embedding")
    width = model.patch_embed.proj.out_channels
    norms = [model.blocks[0].norm1, model.blocks[1].norm2, model.norm]
    assert width == 16 and all(n.normalized_shape == (width,) and n.weight.shape == (width,) for n in norms)


class GroupNormed(nn.Module):
    """Two convolutions each followed by a GroupNorm of several groups (ResNetV2's GroupNormAct, BiT, ViT hybrids)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(in_channels, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(8, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))).mean((2, 3)))


def test_a_group_norm_of_several_groups_loses_whole_groups(tmp_path):
    """Torch-Pruning keeps a GroupNorm's `num_groups`, so a plan keeping a count it does not divide crashed the budget
    search (timm's vit_small_r26_s32_224: "Expected number of channels in input to be divisible by num_groups"). Its
    groups are now units: removing whole ones keeps the others' statistics, so the pruned model computes what the dense
    one does with those groups silenced."""
    torch.manual_seed(0)
    model = create("test_group_normed").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    assert (groups["conv1"].unit, groups["conv2"].unit) == (4, 2)
    check_prunable(model, SHAPE)
    dense, keep = copy.deepcopy(model), {"conv1": [4, 5, 6, 7, 12, 13, 14, 15], "conv2": [0, 1, 6, 7, 8, 9]}
    apply_channel_plan(model, ChannelPlan(keep, {"conv1": 16, "conv2": 16}), SHAPE)
    assert (model.norm1.num_groups, model.norm1.num_channels, model.norm2.num_groups, model.norm2.num_channels) == (
        2,
        8,
        3,
        6,
    )
    with torch.no_grad():  # the norms' affine parameters of the removed channels too (a silenced group gives its bias)
        for name, norm in (("conv1", dense.norm1), ("conv2", dense.norm2)):
            dropped = [c for c in range(16) if c not in keep[name]]
            norm.weight[dropped], norm.bias[dropped] = 0, 0
    equals_silenced_dense_and_reloads(model, silence(dense, groups, keep), tmp_path)
    pruned_and_reloaded(create("test_group_normed").eval(), SHAPE, None, tmp_path)


class ExpandingGrouped(nn.Module):
    """A grouped convolution that widens its input (CPUBone's spatial convolutions: groups=2, 8 -> 32 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


def test_a_grouped_convolution_that_widens_its_input_loses_as_many_outputs_in_each_group(tmp_path):
    """Its outputs were kept whole ("its input and output groups differ in size"), and cpubone_t0 could not reach half
    its FLOPs; its outputs are now equal blocks, one per convolution group (its input stays whole)."""
    torch.manual_seed(0)
    model = create("test_expanding_grouped").eval()
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    assert "conv1" not in groups and (groups["conv2"].blocks, groups["conv2"].tied) == (2, [])
    check_prunable(model, SHAPE)  # BatchNorm only: held to the dense model with the removed channels silenced
    model = pruned_and_reloaded(model, SHAPE, None, tmp_path)
    assert (model.conv2.groups, model.conv2.in_channels, model.conv2.out_channels, model.conv3.in_channels) == (
        2,
        8,
        16,
        16,
    )
    with pytest.raises(ValueError, match="equal chunks"):
        apply_channel_plan(
            create("test_expanding_grouped").eval(), ChannelPlan({"conv2": list(range(12))}, {"conv2": 32}), SHAPE
        )
