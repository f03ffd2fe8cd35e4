"""Layers whose channels cannot be removed, in models beyond prunelab's own backbones (structure/surgery.py's
`check_prunable`): refused before any training, in one line naming them, and `structure.skip` keeps them whole while
the rest is pruned."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHAPE,
    EpochRecorder,
    make_cfg,
    register_backbones,
    run_cli,
)
from torch import nn

from prunelab import load_model, pipeline
from prunelab.structure import (
    UnprunableError,
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
            "test_bookkept": Bookkept,
        },
    )


class FixedWidthMixer(nn.Module):
    """Mixes pixels with a reshape that hard-codes its channel count (the model's own bookkeeping)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], self.channels, x.shape[2] * x.shape[3])
        return (flat - flat.mean(-1, keepdim=True)).reshape(x.shape)


class Bookkept(nn.Module):
    """Two conv blocks; the second block's output passes through `FixedWidthMixer`, so `conv2` must keep its
    channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.mixer = FixedWidthMixer(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.mixer(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_layer_that_breaks_is_named_with_the_skip_that_keeps_it_whole():
    model = Bookkept().eval()
    with pytest.raises(UnprunableError) as caught:
        check_prunable(model, SHAPE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot prune channels of 'conv2' (removing channels of group 'conv2' breaks 'mixer': RuntimeError"
    )
    assert message.endswith("set structure.skip=[conv2] to keep it whole and prune the rest")

    model_record(model).skip = ("conv2",)
    assert [g.name for g in channel_groups(model, SHAPE)] == ["conv1"]
    check_prunable(model, SHAPE)


class HardWired(nn.Module):
    """A mixer that reshapes its input to the width it was built with (kept where no bookkeeping finds it), then writes
    the stream with `proj`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layout, self.proj = (channels,), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(x.shape[0], *self.layout, x.shape[2] * x.shape[3]).tanh().reshape(x.shape))


class HardWiredBlocks(nn.Module):
    """A stem and two residual blocks, each adding a `HardWired` mixer's output to the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": HardWired(8)}) for _ in range(2))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["attn"](x)
        return self.fc(x.mean((2, 3)))


def test_the_skip_a_refusal_suggests_for_repeated_blocks_keeps_their_layers_whole():
    """The suggested pattern names the failing module in every block with a wildcard (`blocks.*.attn`); it must keep
    the layers inside those modules whole (a glob matched the module names only, not their children's: efficientvit_m0
    was refused again with the very setting the refusal suggested)."""
    model = HardWiredBlocks().eval()
    with pytest.raises(UnprunableError, match=re.escape("set structure.skip=[blocks.*.attn] to keep it whole")):
        check_prunable(model, SHAPE)
    model_record(model).skip = ("blocks.*.attn",)
    check_prunable(model, SHAPE)


class LongChain(nn.Module):
    """Sixteen convolutions in a row; the output of the twelfth passes through `FixedWidthMixer`."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(16))
        self.mixer = FixedWidthMixer(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            x = self.mixer(x) if i == 11 else x
        return self.fc(x.mean((2, 3)))


def test_the_groups_that_break_are_found_by_halving_not_one_forward_pass_each(monkeypatch):
    import prunelab.structure.surgery as surgery_module

    tries = []
    original = surgery_module._breaks
    monkeypatch.setattr(
        surgery_module,
        "_breaks",
        lambda model, graph, groups, *a: tries.append(len(groups)) or original(model, graph, groups, *a),
    )
    with pytest.raises(
        UnprunableError,
        match=r"^cannot prune channels of 'convs[.][*]' .removing channels of group 'convs.11' breaks 'mixer'",
    ):
        check_prunable(LongChain().eval(), SHAPE)
    # All 16 together, then halves down to the one (depth first): 9 forward passes, where trying each alone took 17.
    assert tries == [16, 8, 8, 4, 2, 2, 1, 1, 4]


class Flipped(nn.Module):
    """A channel reversal between two convolutions: shapes survive any pruning, the function does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x))).flip(1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1), 1))


def test_a_wrongly_followed_permutation_is_caught_by_the_outputs():
    """Torch-Pruning takes the flip for an element-wise op; only comparing with the dense model shows it."""
    torch.manual_seed(0)
    with pytest.raises(
        UnprunableError, match="breaks 'conv1': the pruned model's outputs differ from the dense model's"
    ):
        check_prunable(Flipped().eval(), SHAPE)


class NeedsTenChannels(nn.Module):
    """Two branches whose widths must add up to at least 10: each may halve alone, not both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x), self.b(x)], 1)
        if x.shape[1] < 10:
            raise ValueError(f"needs 10 channels, got {x.shape[1]}")
        return self.fc(x.mean((2, 3)))


def test_groups_that_break_only_together_are_refused_too():
    with pytest.raises(
        UnprunableError, match=r"removing channels of all 2 groups at once breaks 'a' .ValueError: needs 10"
    ):
        check_prunable(NeedsTenChannels().eval(), SHAPE)


def test_refused_before_any_training_and_pruned_with_skip(tmp_path):
    overrides = (
        "backbone=timm",
        "backbone.name=test_bookkept",
        "method=l1_filter",
        "budget.flops=0.6",
        "budget.tolerance=0.05",
    )
    recorder = EpochRecorder()
    cfg = make_cfg(tmp_path / "refused", *overrides, "pretrain.epochs=1")
    with pytest.raises(UnprunableError, match=r"set structure.skip=\[conv2\]"):
        pipeline.run(cfg, tmp_path / "refused", callbacks=[recorder])
    assert recorder.epochs == []

    cfg = make_cfg(tmp_path / "skip", *overrides, "structure.skip=[conv2]")
    summary = pipeline.run(cfg, tmp_path / "skip")
    assert summary["model/flops_ratio"] == pytest.approx(0.6, rel=0.05)
    model = load_model(tmp_path / "skip" / "model.pt")
    assert model.conv2.out_channels == 16 and model.conv1.out_channels < 8


def test_cli_says_it_in_one_line(tmp_path):
    done = run_cli(
        "backbone=resnet_tiny", "method=l1_filter", "budget.flops=0.5", "structure.skip=[nope]", cwd=tmp_path
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1].startswith("prunelab: error: structure.skip entry 'nope' names no layer")
    )
