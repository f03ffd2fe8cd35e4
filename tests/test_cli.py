"""The `prunelab` command as a user runs it: help, printed config, bad names, runs and grids."""

from __future__ import annotations

import json

import pytest

from conftest import FAST, run_cli, shared_path


def test_help_lists_groups_and_choices(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in ["dataset", "backbone", "method", "budget", "trainer", "logger", "experiment", "paths"]:
        assert f"{group}:" in out.stdout, group
    assert "cifar10" in out.stdout and "resnet56" in out.stdout and "wandb" in out.stdout


def test_cfg_job_prints_composed_config(tmp_path):
    out = run_cli("--cfg", "job", "dataset=cifar10", "backbone=resnet56", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: resnet56" in out.stdout and "CIFAR10DataModule" in out.stdout


@pytest.mark.parametrize(
    "override, expected",
    [("dataset=imagenett", "cifar10"), ("backbone=resnet21", "resnet20"), ("method=nope", "dense")],
)
def test_unknown_names_fail_with_choices(tmp_path, override, expected):
    out = run_cli(override, cwd=tmp_path)
    assert out.returncode != 0
    assert "Available options" in out.stderr and expected in out.stderr


def test_unknown_key_fails(tmp_path):
    out = run_cli("trainer.max_epoch=2", cwd=tmp_path)
    assert out.returncode != 0 and "max_epoch" in out.stderr


def test_multirun_grid_and_rerun_resumes(tmp_path):
    args = ["-m", *FAST, "trainer.limit_train_batches=2", "seed=0,1"]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted((tmp_path / "outputs" / "runs").glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["dense/params"] for p in summaries} != set()
    assert all((p.parent / "config.yaml").exists() for p in summaries)
    first = [p.stat().st_mtime_ns for p in summaries]

    # The same command again finds every stage done and rewrites only the summaries.
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "already done" in out.stdout + out.stderr
    assert sorted((tmp_path / "outputs" / "runs").glob("*/summary.json")) == summaries
    assert all((p.parent / "stages" / "0-train" / "done.json").stat().st_mtime_ns < t for p, t in zip(summaries, first))


def test_pretrained_resnet20_on_shared_cifar10_subset(tmp_path):
    root = shared_path("data", "cifar-10-subset")
    weights = shared_path("weights", "cifar10", "resnet20-12fca82f.th")
    out = run_cli(
        "dataset=cifar10",
        f"dataset.root={root}",
        "dataset.val_size=500",
        "dataset.num_workers=0",
        "backbone=resnet20",
        f"backbone.pretrained={weights}",
        "method=dense",
        "trainer.max_epochs=0",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test/acc"] == pytest.approx(91.6, abs=0.5)
    # He et al.'s ResNet-20: 0.27M parameters and about 41M multiply-accumulates on 32x32 inputs.
    assert summary["model/params"] == 269_722
    assert 40e6 < summary["model/flops"] < 42e6


def test_wandb_logger_works_offline_and_logs_config(tmp_path):
    out = run_cli(*FAST, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline W&B run was written"
    # The offline record holds the resolved config and the summary metrics (protobuf strings are raw).
    record = runs[0].read_bytes()
    assert b"resnet_tiny" in record and b"SyntheticDataModule" in record and b"test/acc" in record


def test_quickstart_preset_prunes_and_prints_before_after_table(tmp_path):
    out = run_cli(
        "experiment=quickstart",
        "pretrain.epochs=3",
        "retrain.epochs=1",
        "latency.repeats=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("accuracy (%)", "FLOPs (MACs)", "parameters", "latency batch 1 (ms)", "latency batch 64 (ms)"):
        assert row in out.stdout, row
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model/flops_ratio"] == pytest.approx(0.5, rel=0.02)
    assert summary["dense/test/acc"] > 50.0  # three epochs on real digits already clear chance (10%) by far
    assert (tmp_path / "run" / "model.ts").exists() and (tmp_path / "run" / "model.pt").exists()
