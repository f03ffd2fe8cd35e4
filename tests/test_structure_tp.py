"""Torch-Pruning is used, not patched: prunelab's graph leaves Torch-Pruning's own modules and classes as they are, so
Torch-Pruning's own pruners give the same result in a process that ran prunelab as in one that never imported it."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from prunelab.structure import ChannelPlan, apply_channel_plan, channel_groups

tp = pytest.importorskip("torch_pruning")

SHAPE = (3, 16, 16)

# Torch-Pruning's stock MetaPruner on a model with a GroupNorm of 4 groups, a grouped convolution and (`bias=False`) a
# GroupNorm without a bias; what it gives, or the exception it raises, as JSON. Plain torch and Torch-Pruning only, so
# that it runs as it is in a process that never imported prunelab.
STOCK = r"""
import json, sys
import torch
from torch import nn
import torch_pruning as tp


class Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.GroupNorm(2, 16)
        if not bias:
            self.norm2.register_parameter("bias", None)
        self.conv3, self.norm3 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        x = torch.relu(self.norm3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def net(bias=True):
    torch.manual_seed(0)
    model = Net(bias).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    return model


def state(model):
    attrs = (
        "num_groups", "num_channels", "groups", "in_channels", "out_channels", "num_features", "in_features",
        "out_features",
    )
    return {
        "parameters": {k: [list(v.shape), v.flatten().tolist()] for k, v in model.state_dict().items()},
        "modules": {n: {a: getattr(m, a) for a in attrs if hasattr(m, a)} for n, m in model.named_modules()},
    }


def stock(bias):
    model = net(bias)
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
            ignored_layers=[model.fc]
        )
        pruner.step()
        with torch.no_grad():
            out = model(example)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {**state(model), "output": out.flatten().tolist()}


if __name__ == "__main__":
    print(json.dumps({"plain": stock(True), "bias-less": stock(False), "prunelab": "prunelab" in sys.modules}))
"""


def _stock_module() -> types.ModuleType:
    module = types.ModuleType("stock_torch_pruning")
    exec(compile(STOCK, "stock_torch_pruning", "exec"), module.__dict__)
    return module


def _prune_with_prunelab(model: torch.nn.Module) -> None:
    """prunelab's groups and surgery: the first half of every group (whole GroupNorm and convolution groups) kept."""
    groups = channel_groups(model, SHAPE)
    plan = ChannelPlan({g.name: list(range(g.size // 2)) for g in groups}, {g.name: g.size for g in groups})
    apply_channel_plan(model, plan, SHAPE)


def test_torch_pruning_gives_its_stock_result_after_prunelab_pruned_in_the_same_process():
    stock = _stock_module()
    for bias in (True, False):
        model = stock.net(bias)
        _prune_with_prunelab(model)
        assert model.norm1.num_groups == 2 and model.conv2.groups == 2 and model.norm2.num_groups == 1
        assert (model.norm2.bias is None) == (not bias)
    here = {"plain": stock.stock(True), "bias-less": stock.stock(False), "prunelab": False}
    ran = subprocess.run([sys.executable, "-c", STOCK], capture_output=True, text=True, check=True, timeout=300)
    fresh = json.loads(ran.stdout)
    assert (
        "error" not in fresh["plain"] and fresh["plain"]["modules"]["norm1"]["num_groups"] == 4
    )  # Torch-Pruning keeps it
    assert "error" in fresh["bias-less"]  # its GroupNorm pruner cuts a bias the norm does not have
    assert here == fresh


def _torch_pruning_state() -> dict[tuple[str, str], int]:
    """The identity of every attribute of Torch-Pruning's modules and of the classes they define."""
    found: dict[tuple[str, str], int] = {}
    for name, module in list(sys.modules.items()):
        if name != "torch_pruning" and not name.startswith("torch_pruning."):
            continue
        for key, value in vars(module).items():
            if key == "__warningregistry__":  # Python's record of the warnings a module gave
                continue
            found[(name, key)] = id(value)
            if isinstance(value, type) and value.__module__.startswith("torch_pruning"):
                found.update({(f"{value.__module__}.{value.__qualname__}", k): id(v) for k, v in vars(value).items()})
    return found


def _foreign_functions() -> list[str]:
    """Functions in Torch-Pruning's classes that Torch-Pruning did not define (a patch made earlier in the process)."""
    found = []
    for name, module in list(sys.modules.items()):
        if name == "torch_pruning" or name.startswith("torch_pruning."):
            for cls in [
                v for v in vars(module).values() if isinstance(v, type) and v.__module__.startswith("torch_pruning")
            ]:
                for key, value in vars(cls).items():
                    home = (
                        (value.__module__ or "").partition(".")[0]
                        if isinstance(value, types.FunctionType)
                        else "torch_pruning"
                    )
                    if (
                        home != "torch_pruning" and home not in sys.stdlib_module_names
                    ):  # not namedtuple's or enum's own
                        found.append(f"{cls.__qualname__}.{key} from {value.__module__}")
    return found


def test_prunelab_assigns_nothing_in_torch_pruning_while_it_builds_reads_and_prunes():
    """Checked before, after, and at every 20th call into Torch-Pruning's code on the way (a swap undone at the end of a
    `with` block is seen too)."""
    import torch_pruning  # noqa: F401  (its modules are all loaded before the first snapshot)
    from torch_pruning import pruner  # noqa: F401

    stock = _stock_module()
    model = stock.net(False)
    tp._helpers.GroupItem(None, [])  # Torch-Pruning's own: each GroupItem made sets the class's `root_idxs` to None
    before = _torch_pruning_state()
    files = {
        m.__file__
        for n, m in list(sys.modules.items())
        if n.startswith("torch_pruning") and getattr(m, "__file__", None)
    }
    changed: set[tuple[str, str]] = set()
    calls = [0]

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in files:
            calls[0] += 1
            if calls[0] % 20:
                return
            now = _torch_pruning_state()
            changed.update(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))

    sys.setprofile(watch)
    try:
        _prune_with_prunelab(model)
    finally:
        sys.setprofile(None)
    after = _torch_pruning_state()
    changed.update(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    assert calls[0] > 1000 and sorted(changed) == []
    assert _foreign_functions() == []
