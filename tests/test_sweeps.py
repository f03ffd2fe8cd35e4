"""Sweeps and clusters through Hydra's plugins: an Optuna sweep of 3 trials on the digits, a 2-job grid
through submitit's local launcher (SLURM's stand-in), and the SLURM preset's tasks and GPUs."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import CONF_DIR, run_cli
from hydra import compose, initialize_config_dir

FAST = ["latency.batch_sizes=[]", "quiet=true", "trainer.enable_progress_bar=false"]


def test_an_optuna_sweep_writes_every_trial_and_the_best_config(tmp_path):
    done = run_cli(
        "-m",
        "experiment=pfs_resnet20_digits_optuna",
        "hydra.sweeper.n_trials=3",
        "backbone.width=0.25",
        "method.epochs=1",
        "retrain.epochs=1",
        "budget.tolerance=0.1",
        *FAST,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "outputs" / "sweeps" / "pfs_resnet20_digits_optuna"
    trials = list(csv.DictReader((sweep / "trials.csv").open()))
    assert len(trials) == 3 and all(t["overrides"].startswith("method.gamma=") for t in trials)
    objectives = [float(t["val/acc"]) for t in trials]
    assert objectives == sorted(objectives, reverse=True)
    # Each trial is an ordinary run whose summary holds the objective the sweeper maximised.
    for trial in trials:
        assert json.loads((sweep / trial["run"] / "summary.json").read_text())["val/acc"] == float(trial["val/acc"])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(objectives)
    chosen = yaml.safe_load((sweep / "best_config.yaml").read_text())
    assert trials[0]["overrides"] == f"method.gamma={chosen['method']['gamma']}"
    assert (sweep / "trials.md").read_text().count("| method.gamma=") == 3


def test_a_grid_runs_through_the_submitit_launcher(tmp_path):
    done = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "dataset=synthetic",
        "backbone=resnet_tiny",
        "method=l1_filter,uniform",
        "budget.flops=0.5",
        "trainer.max_epochs=1",
        "retrain.epochs=1",
        *FAST,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "runs").glob("*/summary.json")]
    assert len(summaries) == 2 and all(s["model/flops_ratio"] < 0.6 for s in summaries)
    assert list((tmp_path / "outputs" / "runs" / ".submitit").glob("*/*_result.pkl"))


def test_the_slurm_preset_asks_for_one_task_per_gpu_as_lightning_expects():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 1)
    assert launcher.max_num_timeout > 0  # preempted jobs are requeued (and resume from their checkpoints)


@pytest.mark.slow
def test_a_timed_out_submitit_job_is_requeued_and_resumes_to_the_uninterrupted_result(tmp_path):
    """submitit_local with a 1-minute limit: the ~80 s run (idle machine) is signalled 30 s before each limit, requeued
    (at least once) and resumed from its last checkpoint; it ends with the metrics of a run never stopped."""
    (tmp_path / "sweep").mkdir()
    (tmp_path / "whole").mkdir()
    common = [
        "dataset=synthetic",
        "dataset.train_size=2048",
        "backbone=resnet_tiny",
        "method=dense",
        "trainer.max_epochs=35",
        *FAST,
    ]
    done = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=1",
        *common,
        cwd=tmp_path / "sweep",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / "outputs" / "runs" / ".submitit").glob("*/*_log.out"))
    assert "Requeued job" in logs
    whole = run_cli(*common, cwd=tmp_path / "whole", timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (requeued,) = (tmp_path / "sweep" / "outputs" / "runs").glob("*/summary.json")
    (single,) = (tmp_path / "whole" / "outputs" / "runs").glob("*/summary.json")
    a, b = (json.loads(p.read_text()) for p in (requeued, single))
    assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
        k: v for k, v in b.items() if not k.startswith("time/")
    }
