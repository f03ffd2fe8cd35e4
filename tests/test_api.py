"""The Python API (`prunelab.prune`, `count`, `latency`, `channel_groups`, `export_model`) on a model of the user's
own."""

from __future__ import annotations

import json
import re
import tempfile

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, make_cfg
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab import pipeline
from prunelab.errors import ConfigError
from prunelab.export import load_deployed
from prunelab.structure import ChannelPlan, MaskPlan


class UserNet(nn.Module):
    """A user's own CNN: not a prunelab backbone, no spec, no init_weights."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


# Inputs need not be square: 12 x 20 pixels.
SHAPE = (3, 12, 20)


@pytest.fixture
def model() -> UserNet:
    torch.manual_seed(0)
    return UserNet()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(2)
    inputs, labels = torch.randn(48, *SHAPE, generator=generator), torch.randint(0, 5, (48,), generator=generator)
    train = DataLoader(TensorDataset(inputs[:32], labels[:32]), batch_size=16, shuffle=True)
    test = DataLoader(TensorDataset(inputs[32:], labels[32:]), batch_size=16)
    return train, test


def dense_macs(h: int = 12, w: int = 20) -> int:
    """UserNet's multiply-accumulates on one input, by hand: two 3x3 convolutions per pixel, then the classifier."""
    return h * w * (3 * 16 * 9 + 16 * 32 * 9) + 32 * 5


def test_l1_filter_prunes_a_user_cnn_to_half_the_flops(model, x, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prunelab.prune(model, method="l1_filter", budget={"flops": 0.5}, example_inputs=x, run_dir=tmp_path)

    assert isinstance(result.plan, ChannelPlan)
    # The default threshold search lands within its relative tolerance (budget.tolerance, 1%).
    assert result.report["model/flops_ratio"] == pytest.approx(0.5, rel=0.01)
    assert result.report["dense/flops"] == dense_macs()
    assert prunelab.count(result.model, x)["flops"] == result.report["model/flops"] < dense_macs()
    assert result.report["model/params"] < sum(p.numel() for p in model.parameters())
    assert result.model.eval()(x).shape == (2, 5)
    # The plan names the channels kept of each group; the others were removed from the model.
    removed = {
        name: sorted(set(range(plan_size)) - set(kept))
        for (name, kept), plan_size in zip(result.plan.keep.items(), result.plan.sizes.values())
    }
    assert any(removed.values())
    for name, kept in result.plan.keep.items():
        assert result.model.get_submodule(name).out_channels == len(kept)
    # The caller's model is left as it was; the run directory holds the contract files and the plan.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.run_dir == tmp_path
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(result.report)
    assert ChannelPlan.load_json(tmp_path / "stages" / "0-prune" / "plan.json") == result.plan
    # The final model reloads from the run directory on an unpruned instance of the user's class.
    again = prunelab.load_model(tmp_path / "model.pt", base=UserNet())
    assert torch.equal(again.eval()(x), result.model(x))
    with pytest.raises(ValueError, match=r"load_model\(path, base=<an unpruned instance of that class>\)"):
        prunelab.load_model(tmp_path / "model.pt")
    # The same call again reuses the finished run.
    assert prunelab.prune(model, "l1_filter", {"flops": 0.5}, x, run_dir=tmp_path).plan == result.plan


def test_prune_gives_the_plan_the_command_gives(tmp_path):
    # The command's path: config composed from the command line, backbone and data built from it.
    settings = ["method=l1_filter", "budget.flops=0.5", "retrain=none", "test=false", "latency.batch_sizes=[]"]
    cfg = make_cfg(tmp_path / "cli", *settings)
    summary = pipeline.run(cfg, tmp_path / "cli")
    # The same backbone, built as the pipeline builds it, handed to the API.
    L.seed_everything(cfg.seed)
    model = instantiate(cfg.backbone, num_classes=10, in_channels=3)
    result = prunelab.prune(model, "l1_filter", {"flops": 0.5}, torch.randn(2, 3, 32, 32), run_dir=tmp_path / "api")

    assert result.plan == ChannelPlan.load_json(tmp_path / "cli" / "stages" / "0-prune" / "plan.json")
    for key in ("dense/flops", "dense/params", "model/flops", "model/params", "model/flops_ratio"):
        assert result.report[key] == summary[key], key


def test_run_is_the_commands_experiment_in_this_process(tmp_path):
    settings = ["method=l1_filter", "budget.flops=0.5", "retrain=none", "test=false", "latency.batch_sizes=[]"]
    summary = prunelab.run([*FAST, *settings], tmp_path / "run")
    expected = pipeline.run(make_cfg(tmp_path / "cfg", *settings), tmp_path / "cfg")
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if not k.startswith("time/")} == {
        k: v for k, v in expected.items() if not k.startswith("time/")
    }
    plans = [
        ChannelPlan.load_json(d / "stages" / "0-prune" / "plan.json") for d in (tmp_path / "run", tmp_path / "cfg")
    ]
    assert plans[0] == plans[1]
    # A mistake is the command's one line, raised.
    with pytest.raises(ConfigError, match="nope"):
        prunelab.run(["method=nope"], tmp_path / "bad")


def test_magnitude_reaches_the_exact_sparsity(model, x, tmp_path):
    result = prunelab.prune(model, "magnitude", {"sparsity": 0.5}, x, run_dir=tmp_path)
    assert isinstance(result.plan, MaskPlan)
    assert abs(result.plan.sparsity() - 0.5) < 1e-4
    assert abs(result.report["model/sparsity"] - 0.5) < 1e-4
    assert abs(prunelab.count(result.model, x)["sparsity"] - 0.5) < 1e-4
    # Unstructured pruning keeps the architecture.
    assert result.report["model/flops"] == dense_macs()


def test_latency_is_timed_when_asked(model, x, tmp_path):
    timed = prunelab.prune(
        model,
        "l1_filter",
        {"flops": 0.5},
        x,
        latency=True,
        run_dir=tmp_path / "flops",
        overrides=["latency.batch_sizes=[2]", "latency.repeats=3"],
    )
    # The pruned model is timed beside a copy of the dense one the user gave.
    assert timed.report["model/latency_b2_ms"] > 0 and timed.report["dense/latency_b2_ms"] > 0
    assert "model/deployed_speedup_b2" in timed.report
    assert (
        "model/latency_b2_ms"
        not in prunelab.prune(model, "l1_filter", {"flops": 0.5}, x, run_dir=tmp_path / "off").report
    )


@pytest.mark.slow
def test_a_latency_budget_on_a_user_model(model, tmp_path, monkeypatch):
    # The latency tables are cached under paths.output_root (./outputs); their calibration takes about 12 s.
    monkeypatch.chdir(tmp_path)
    # Inputs large enough for the convolutions to outweigh the calls' overhead.
    result = prunelab.prune(
        model,
        "l1_filter",
        {"latency": 0.7},
        torch.randn(1, 3, 64, 96),
        run_dir=tmp_path / "run",
        overrides=["budget.latency_tolerance=0.4", "latency.rounds=1"],
    )
    # The final model is timed beside a copy of the dense one the user gave, within the tolerance of the target.
    assert result.report["model/flops_ratio"] < 1.0
    assert result.report["model/latency_ratio"] == pytest.approx(0.7, abs=0.4 * 0.7)


@pytest.mark.parametrize(("method", "trained"), [("slimming", "sparsity"), ("taylor", None)])
def test_methods_that_need_data_run_their_stages_on_the_users_loaders(model, method, trained, tmp_path):
    train, test = loaders()
    result = prunelab.prune(
        model,
        method,
        {"flops": 0.5},
        train=train,
        test=test,
        run_dir=tmp_path,
        overrides=["retrain=finetune", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
    )
    report = result.report
    # Example inputs default to the first training batch; the classes follow the model's output.
    assert report["dense/flops"] == dense_macs()
    assert report["model/flops_ratio"] == pytest.approx(0.5, rel=0.01)
    # The dense model is tested, the method's stages train (two batches an epoch), then it is fine-tuned and tested.
    stages = [s["name"] for s in json.loads((tmp_path / "stages.json").read_text())]
    assert stages == ["dense", *([trained] if trained else []), "prune", "finetune", "test"]
    if trained:
        assert report[f"{trained}/steps"] == 2
    assert report["finetune/steps"] == 2 and 0.0 <= report["test/acc"] <= 100.0 and "dense/test/acc" in report


def test_mistakes_stop_in_one_line_before_any_work(model, x, tmp_path):
    train, _ = loaders()
    cases = [
        (dict(method="l1_filte", budget={"flops": 0.5}), r"method='l1_filte' does not exist \(choices: .*l1_filter"),
        (
            dict(method="l1_filter", budget={"flop": 0.5}),
            r"budget key 'flop' is not a budget setting \(budget keys: flops, params",
        ),
        (dict(method="l1_filter", budget={"flops": 1.5}), r"budget\.flops=1\.5 is out of range"),
        (dict(method="l1_filter"), r"L1Filter prunes to a budget: set budget\.flops"),
        (
            dict(method="taylor", budget={"flops": 0.5}),
            r"Taylor scores with training batches, and no training data was given",
        ),
        (dict(method="slimming", budget={"flops": 0.5}), r"stage sparsity \(fit\) needs train data"),
        (
            dict(method="l1_filter", budget={"flops": 0.5}, overrides=["retrain=finetune"]),
            r"stage finetune \(retrain\) needs train data",
        ),
        (
            dict(method="l1_filter", budget={"flops": 0.5}, train=train, overrides=["test=true"]),
            r"stage dense \(test\) needs test data",
        ),
        (
            dict(method="l1_filter", budget={"flops": 0.5}, overrides=["dataset=cifar10"]),
            r"takes the model and the data from Python",
        ),
        (
            dict(method="l1_filter", budget={"flops": 0.5}, overrides=["trainer.max_epoch=1"]),
            r"trainer\.max_epoch is not a setting",
        ),
    ]
    for index, (kwargs, message) in enumerate(cases):
        run_dir = tmp_path / str(index)
        with pytest.raises(ConfigError, match=message) as caught:
            prunelab.prune(model, example_inputs=x, run_dir=run_dir, **kwargs)
        assert "\n" not in str(caught.value), str(caught.value)
        assert not (run_dir / "stages").exists() and not (run_dir / "model.pt").exists()


def test_count_latency_channel_groups_and_export_on_a_user_model(model, x, tmp_path):
    measured = prunelab.count(model, x)
    assert measured == {"flops": dense_macs(), "params": sum(p.numel() for p in model.parameters()), "sparsity": 0.0}
    assert prunelab.latency(model, x, repeats=3) > 0.0
    groups = prunelab.channel_groups(model, x)
    assert [(g.name, g.size) for g in groups] == [("features.0", 16), ("features.3", 32)]
    assert groups[0].norms == ["features.1"] and groups[1].consumers == ["head"]
    for fmt in ("torchscript", "torchscript_frozen"):
        path = prunelab.export_model(model, tmp_path / f"{fmt}.ts", x, format=fmt)
        deployed = load_deployed(path)
        with torch.no_grad():
            assert torch.allclose(deployed(x), model.eval()(x), atol=1e-5)


def doc_snippets(name: str) -> list[str]:
    """The Python code blocks of a Markdown file of the project (README.md, docs/python.md), in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)


@pytest.mark.parametrize("name", ["docs/python.md", "README.md"])
def test_the_docs_python_snippets_run(name, model, x, tmp_path, monkeypatch):
    snippets = doc_snippets(name)
    assert len(snippets) >= (3 if name.startswith("docs") else 1)
    # Runs go to fresh temporary directories (kept), here under tmp_path; exports to the working directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    train_loader, test_loader = loaders()
    scope = {"model": model, "x": x, "train_loader": train_loader, "test_loader": test_loader}
    for snippet in snippets:
        exec(compile(snippet, name, "exec"), scope)
    assert scope["result"].model(x).shape == (2, 5)
