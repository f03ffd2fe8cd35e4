"""Shared test helpers: composing configs, locating the shared data, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED = ROOT.parent / "shared"

# Small, fast settings every pipeline test starts from.
FAST = [
    "dataset=synthetic",
    "backbone=resnet_tiny",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def make_cfg(output_dir: Path, *overrides: str) -> DictConfig:
    """Compose the project's config as the CLI would, with the run directory set to `output_dir`."""
    import prunelab.cli  # noqa: F401  (registers the run_id resolver)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={output_dir}", *FAST, *overrides])


def preset(name: str) -> DictConfig:
    """An experiment preset composed as the CLI composes it (without the tests' fast overrides)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "paths.output_dir=unused"])


def run_cli(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the `prunelab` command in a subprocess, as a user would (`env`: variables to add, e.g. PYTHONPATH)."""
    env = {**os.environ, "PRUNELAB_OUTPUTS": str(cwd / "outputs"), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prunelab.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with a clear message when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the read-only ../shared folder beside the repo")
    return path


class CrashAtEpoch(L.Callback):
    """Simulates a killed run: fails when the given epoch starts (the previous one is checkpointed).

    With `stage`, only in the fit stage of that tag (e.g. "round2/rewind").
    """

    def __init__(self, epoch: int, stage: str | None = None):
        self.epoch = epoch
        self.stage = stage

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.stage in (None, pl_module.stage):
            raise RuntimeError("simulated crash")


class EpochRecorder(L.Callback):
    """Records the epochs that training starts (and in which stages), to see what a resumed run redoes."""

    def __init__(self):
        self.epochs: list[int] = []
        self.stages: list[tuple[str, int]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)
        self.stages.append((pl_module.stage, trainer.current_epoch))


def randomize_bn(model: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.1
            m.running_mean = torch.randn(n, generator=gen) * 0.1
            m.running_var = torch.rand(n, generator=gen) + 0.5


class CrashAtValidation(L.Callback):
    """Simulates a run killed after optimizer step `step` of a fit stage, as the validation after it starts."""

    def __init__(self, step: int, stage: str | None = None):
        self.step = step
        self.stage = stage

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step == self.step and not trainer.sanity_checking and self.stage in (None, pl_module.stage):
            raise RuntimeError("simulated crash")


class CrashAtStep(L.Callback):
    """Simulates a run killed inside an epoch: fails before optimizer step `step` + 1 of a fit stage."""

    def __init__(self, step: int, stage: str | None = None):
        self.step = step
        self.stage = stage

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.stage in (None, pl_module.stage):
            raise RuntimeError("simulated crash")
