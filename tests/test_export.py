"""Tests for saving, reloading and exporting pruned and masked models."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from prunelab.backbones import create
from prunelab.export import FORMATS, export_deployable, load_model, save_model
from prunelab.structure import ChannelPlan, MaskPlan, apply_channel_plan, attach_masks, channel_groups, has_masks

SHAPE = (3, 32, 32)


def random_plan(model: nn.Module, seed: int) -> ChannelPlan:
    rng = random.Random(seed)
    groups = channel_groups(model, SHAPE)
    keep = {g.name: sorted(rng.sample(range(g.size), max(1, g.size // 2))) for g in groups}
    return ChannelPlan(keep, {g.name: g.size for g in groups})


def pruned_resnet(plans: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = create("resnet_tiny")
    model.prunelab.input_shape = SHAPE
    for seed in range(plans):
        apply_channel_plan(model, random_plan(model, seed), SHAPE)
    randomize_bn(model)
    return model.eval()


def half_masks(model: nn.Module) -> MaskPlan:
    gen = torch.Generator().manual_seed(0)
    return MaskPlan(
        {
            f"{name}.weight": torch.rand(m.weight.shape, generator=gen) < 0.5
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
    )


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("plans", [1, 2])
def test_pruned_model_round_trip(tmp_path, plans: int) -> None:
    model = pruned_resnet(plans)
    x = torch.randn(3, *SHAPE)
    path = save_model(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert len(payload["plans"]) == plans and payload["input_shape"] == list(SHAPE)
    loaded = load_model(path)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert [p.keep for p in loaded.prunelab.plans] == [p.keep for p in model.prunelab.plans]
    assert loaded.prunelab.input_shape == SHAPE
    assert loaded.layer3[0].conv1.out_channels == model.layer3[0].conv1.out_channels == 64 // 2**plans


def test_masked_model_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = create("vgg_tiny")
    randomize_bn(model)
    plan = half_masks(model)
    attach_masks(model, plan)
    x = torch.randn(3, *SHAPE)
    path = save_model(model, tmp_path / "masked.pt")
    payload = torch.load(path, weights_only=True)
    assert not any("parametrizations" in k for k in payload["state_dict"])
    assert has_masks(model)
    loaded = load_model(path)
    assert not has_masks(loaded)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    assert set(loaded.prunelab.masks.masks) == set(plan.masks)
    assert all(torch.equal(loaded.prunelab.masks.masks[k], plan.masks[k]) for k in plan.masks)
    assert torch.all(loaded.features[4].weight[~plan.masks["features.4.weight"]] == 0)


def test_loading_into_another_architecture_fails(tmp_path) -> None:
    path = save_model(pruned_resnet(), tmp_path / "pruned.pt")
    payload = torch.load(path, weights_only=True)
    payload["spec"]["name"] = "vgg_tiny"
    torch.save(payload, tmp_path / "wrong_plan.pt")
    with pytest.raises(ValueError, match="another architecture"):
        load_model(tmp_path / "wrong_plan.pt")

    dense = create("vgg_tiny")
    payload = torch.load(save_model(dense, tmp_path / "dense.pt"), weights_only=True)
    payload["spec"]["name"] = "resnet_tiny"
    torch.save(payload, tmp_path / "wrong_weights.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "wrong_weights.pt")


def test_plans_need_an_input_shape(tmp_path) -> None:
    model = pruned_resnet()
    model.prunelab.input_shape = None
    with pytest.raises(ValueError, match="no input shape"):
        save_model(model, tmp_path / "model.pt")


# Each format, and how a user loads it with nothing of prunelab (prunelab's import is made to fail).
LOADERS = {
    "torchscript": "m = torch.jit.load(PATH); y = m(x)",
    "torchscript_frozen": "m = torch.jit.load(PATH); y = m(x)",
    "onnx": (
        "import onnxruntime as ort; s = ort.InferenceSession(PATH, providers=['CPUExecutionProvider']); "
        "y = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])"
    ),
}


@pytest.mark.parametrize("fmt", list(LOADERS))
def test_export_deployable_runs_without_prunelab(tmp_path, fmt) -> None:
    model = pruned_resnet()
    attach_masks(model, half_masks(model))
    x = torch.randn(5, *SHAPE)  # another batch size than the export's example (1) and check (2)
    expected = outputs(model, x)
    path = export_deployable(model, tmp_path / FORMATS[fmt], SHAPE, fmt)
    assert has_masks(model) and path.suffix == (".onnx" if fmt == "onnx" else ".ts")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys; sys.modules['prunelab'] = None; import torch; "
        f"PATH = {str(path)!r}; x = torch.load({str(tmp_path / 'x.pt')!r}); "
        f"{LOADERS[fmt]}; torch.save(y, {str(tmp_path / 'y.pt')!r})"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", script], check=True, timeout=120)
    # Folding BatchNorm (frozen, ONNX) changes the rounding only.
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_frozen_export_folds_batchnorm_and_a_wrong_export_is_refused(tmp_path, monkeypatch) -> None:
    model = pruned_resnet()
    frozen = torch.jit.load(str(export_deployable(model, tmp_path / "a.ts", SHAPE, "torchscript_frozen")))
    plain = torch.jit.load(str(export_deployable(model, tmp_path / "b.ts", SHAPE, "torchscript")))
    assert "batch_norm" not in str(frozen.graph) and "batch_norm" in str(plain.inlined_graph)
    # The reloaded file is checked against the model: one whose outputs drift is refused.
    import prunelab.export as export

    real = export.load_deployed
    monkeypatch.setattr(export, "load_deployed", lambda *a, **k: lambda x: real(*a, **k)(x) * 1.01)
    with pytest.raises(RuntimeError, match="differs from the model"):
        export_deployable(model, tmp_path / "c.ts", SHAPE, "torchscript_frozen")
