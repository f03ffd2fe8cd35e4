"""The pipeline's contracts: summary keys, reloadable model, resume after a crash, schedules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CrashAtEpoch, EpochRecorder, make_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prunelab import load_model, pipeline
from prunelab.budget import count_flops, count_params
from prunelab.errors import ConfigError
from prunelab.lit import PruneLitModule, cosine, multistep

SUMMARY_KEYS = [
    "test/acc",
    "test/acc5",
    "model/flops",
    "model/params",
    "model/flops_ratio",
    "model/params_ratio",
    "model/sparsity",
    "dense/flops",
    "dense/params",
    "time/train_s",
    "time/test_s",
]


def test_dense_run_writes_contract_files(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_epochs=2")
    summary = pipeline.run(cfg, tmp_path)

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == pytest.approx(summary)
    for key in SUMMARY_KEYS:
        assert key in on_disk, key
    assert 0.0 <= on_disk["test/acc"] <= 100.0
    assert on_disk["model/flops_ratio"] == 1.0 and on_disk["model/sparsity"] == 0.0
    assert on_disk["train/val/acc"] >= 0.0
    resolved = OmegaConf.load(tmp_path / "config.yaml")
    assert resolved.backbone.name == "resnet_tiny" and resolved.paths.output_dir == str(tmp_path)
    # Each invocation logs to a new version folder, so resuming never overwrites earlier logs.
    (csv,) = tmp_path.glob("logs/version_*/metrics.csv")
    assert "train/val/acc" in csv.read_text().splitlines()[0]

    # The final model reloads without the config and computes the same function.
    model = load_model(tmp_path / "model.pt").eval()
    assert count_params(model) == on_disk["model/params"]
    assert count_flops(model, (3, 32, 32)) == on_disk["model/flops"]


def test_accuracy_is_percent_and_learns_synthetic(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_epochs=3", "optimizer.lr=0.05")
    summary = pipeline.run(cfg, tmp_path)
    # Ten classes: chance is 10%; the synthetic classes are separable, so a few epochs clear it well.
    assert summary["test/acc"] > 30.0


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, tmp_path, callbacks=[CrashAtEpoch(2)])
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob("stages/*/done.json"))
    assert (tmp_path / "stages" / "0-train" / "checkpoints" / "last.ckpt").exists()

    recorder = EpochRecorder()
    summary = pipeline.run(cfg, tmp_path, callbacks=[recorder])
    assert recorder.epochs == [2]
    assert (tmp_path / "summary.json").exists() and "test/acc" in summary

    # A completed run re-run does no work at all: every stage is skipped.
    again = EpochRecorder()
    assert pipeline.run(cfg, tmp_path, callbacks=[again])["test/acc"] == summary["test/acc"]
    assert again.epochs == []


def test_only_the_settings_that_decide_a_result_are_recorded(tmp_path):
    record = pipeline.experiment_record(make_cfg(tmp_path, "method=l1_filter", "budget.flops=0.5"))
    assert record["method._target_"] == "prunelab.methods.baselines.L1Filter" and record["budget.flops"] == 0.5
    # What is printed or logged, where files are, devices and the export/timing redone by every invocation.
    same = make_cfg(
        tmp_path / "elsewhere",
        "method=l1_filter",
        "budget.flops=0.5",
        "quiet=true",
        "logger=tensorboard",
        "trainer.devices=2",
        "trainer.accelerator=gpu",
        "dataset.num_workers=4",
        "export.format=onnx",
        "latency.batch_sizes=[8]",
        "checkpoint_every_n_steps=3",
        "verbose_libraries=true",
    )
    assert pipeline.experiment_differences(record, pipeline.experiment_record(same)) == []
    changed = make_cfg(tmp_path, "method=l1_filter", "budget.flops=0.5", "seed=1", "trainer.precision=bf16-mixed")
    assert pipeline.experiment_differences(record, pipeline.experiment_record(changed)) == [
        ("seed", 0, 1),
        ("dataset.seed", 0, 1),
        ("trainer.precision", "32-true", "bf16-mixed"),
    ]
    # Under a latency budget, its format (the export format by default) decides the architecture.
    latency = [
        pipeline.experiment_record(make_cfg(tmp_path, "method=l1_filter", "budget.latency=0.5", f"export.format={f}"))
        for f in ("onnx", "torchscript")
    ]
    assert pipeline.experiment_differences(*latency) == [("budget.latency_format", "onnx", "torchscript")]
    # A setting one record lacks (added to prunelab since the run started) differs only when it is set.
    older = {k: v for k, v in record.items() if k not in ("test_pruned", "label_smoothing")}
    assert pipeline.experiment_differences(older, record) == []
    assert pipeline.experiment_differences(older, {**record, "test_pruned": True}) == [("test_pruned", "absent", True)]


def test_a_run_directory_from_before_records_resumes_and_is_recorded(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_epochs=2")
    pipeline.run(cfg, tmp_path)
    record = tmp_path / pipeline.EXPERIMENT_FILE
    assert json.loads(record.read_text()) == pipeline.experiment_record(cfg)
    record.unlink()

    recorder = EpochRecorder()
    pipeline.run(cfg, tmp_path, callbacks=[recorder])
    assert recorder.epochs == [] and json.loads(record.read_text()) == pipeline.experiment_record(cfg)
    summary = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(
        ConfigError, match=r"holds another experiment: trainer\.max_epochs \(2 here, 3 asked\) \(use another"
    ):
        pipeline.run(make_cfg(tmp_path, "trainer.max_epochs=3"), tmp_path, callbacks=[recorder])
    assert recorder.epochs == [] and (tmp_path / "summary.json").read_bytes() == summary


def test_a_command_refused_before_any_work_leaves_its_run_directory_free(tmp_path):
    # The missing budget is found after the record is written, but before the run computes anything.
    with pytest.raises(ConfigError, match=r"L1Filter prunes to a budget: set budget.flops"):
        pipeline.run(make_cfg(tmp_path, "method=l1_filter"), tmp_path)
    assert json.loads((tmp_path / pipeline.EXPERIMENT_FILE).read_text())["budget.flops"] is None
    summary = pipeline.run(
        make_cfg(tmp_path, "method=l1_filter", "budget.flops=0.5", "latency.batch_sizes=[]"), tmp_path
    )
    assert summary["model/flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert json.loads((tmp_path / pipeline.EXPERIMENT_FILE).read_text())["budget.flops"] == 0.5


def test_checkpoints_load_with_weights_only(tmp_path):
    cfg = make_cfg(tmp_path)
    pipeline.run(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "stages" / "0-train" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "state_dict" in ckpt and ckpt["hyper_parameters"]["stage"] == "train"


def test_same_seed_same_result(tmp_path):
    a = pipeline.run(make_cfg(tmp_path / "a", "seed=3"), tmp_path / "a")
    b = pipeline.run(make_cfg(tmp_path / "b", "seed=3"), tmp_path / "b")
    assert a["test/acc"] == b["test/acc"] and a["test/loss"] == b["test/loss"]


def test_max_epochs_zero_only_evaluates(tmp_path):
    recorder = EpochRecorder()
    summary = pipeline.run(make_cfg(tmp_path, "trainer.max_epochs=0"), tmp_path, callbacks=[recorder])
    assert recorder.epochs == []
    assert "test/acc" in summary and not (tmp_path / "stages" / "0-train" / "checkpoints").exists()


def test_schedules():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = multistep(opt, epochs=100, milestones=[0.5, 0.75], gamma=0.1)
    assert sorted(sched.milestones) == [50, 75]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = cosine(opt, epochs=4)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizers_and_label_smoothing_from_config(tmp_path, name):
    cfg = make_cfg(tmp_path, f"optimizer={name}", "label_smoothing=0.1")
    model = torch.nn.Linear(4, 3)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    assert type(optimizer).__name__ == {"sgd": "SGD", "adam": "Adam"}[name]

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = PruneLitModule(model, num_classes=3, label_smoothing=0.0)
    smooth = PruneLitModule(model, num_classes=3, label_smoothing=cfg.label_smoothing)
    assert smooth.training_step((x, y), 0).item() != pytest.approx(plain.training_step((x, y), 0).item())


def test_channels_last_training_gives_the_eager_run(tmp_path):
    """trainer.channels_last (on by default with trainer=gpu): same plan and metrics up to rounding; the
    model leaves every stage in the default memory order."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        runs[flag] = pipeline.run(
            make_cfg(
                out,
                "method=l1_filter",
                "budget.flops=0.5",
                "budget.tolerance=0.1",
                "pretrain.epochs=1",
                "retrain.epochs=1",
                "optimizer.lr=0.02",
                f"trainer.channels_last={flag}",
                "latency.batch_sizes=[]",
                "quiet=true",
            ),
            out,
        )
    assert (tmp_path / "false" / "stages" / "2-prune" / "plan.json").read_text() == (
        tmp_path / "true" / "stages" / "2-prune" / "plan.json"
    ).read_text()
    # Convolutions in the other memory order sum in another order: rounding, which training then grows.
    assert runs["true"]["pretrain/train/loss"] == pytest.approx(runs["false"]["pretrain/train/loss"], rel=1e-4)
    assert runs["true"]["test/loss"] == pytest.approx(runs["false"]["test/loss"], rel=1e-2)
    assert runs["true"]["test/acc"] == runs["false"]["test/acc"]
    model = load_model(tmp_path / "true" / "model.pt")
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.slow
def test_compiled_training_gives_the_eager_run(tmp_path):
    """trainer.compile=true (torch.compile per fit, about 90 s of compiling on CPU): same plan and accuracy."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        runs[flag] = pipeline.run(
            make_cfg(
                out,
                "method=l1_filter",
                "budget.flops=0.5",
                "budget.tolerance=0.1",
                "pretrain.epochs=1",
                "retrain.epochs=1",
                "optimizer.lr=0.02",
                f"trainer.compile={flag}",
                "latency.batch_sizes=[]",
                "quiet=true",
            ),
            out,
        )
    assert (tmp_path / "false" / "stages" / "2-prune" / "plan.json").read_text() == (
        tmp_path / "true" / "stages" / "2-prune" / "plan.json"
    ).read_text()
    assert runs["true"]["pretrain/train/loss"] == pytest.approx(runs["false"]["pretrain/train/loss"], rel=1e-4)
    assert runs["true"]["test/acc"] == runs["false"]["test/acc"]
    assert load_model(tmp_path / "true" / "model.pt")(torch.randn(2, 3, 32, 32)).shape == (2, 10)
