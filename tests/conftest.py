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

# The typed schemas the configs build on, in Hydra's ConfigStore for every composition below (make_cfg, preset).
import prunelab.schema  # noqa: F401

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


# Helpers of the structure tests on models beyond prunelab's own backbones (test_unprunable, test_reshapes,
# test_layers, test_group_walk, test_heads, test_timm_attention, test_torchvision_attention).

SHAPE = (3, 32, 32)


def register_backbones(monkeypatch, factories: dict) -> None:
    """Register a test file's models as backbones for its tests only (other files list the registry)."""
    from prunelab.backbones import registry

    for name, factory in factories.items():
        monkeypatch.setitem(registry._REGISTRY, name, factory)


def conv_bn(c_in: int, c_out: int, k: int = 1, act: bool = True, groups: int = 1) -> torch.nn.Sequential:
    layers = [
        torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
        torch.nn.BatchNorm2d(c_out),
    ]
    return torch.nn.Sequential(*layers, *([torch.nn.ReLU()] if act else []))


def random_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm (of any dimension) random statistics and affine parameters from torch's global generator,
    so that no branch starts silent (`randomize_bn`: BatchNorm2d only, from a generator of its own)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                (
                    m.weight.uniform_(0.5, 1.5),
                    m.bias.normal_(0, 0.1),
                    m.running_mean.normal_(0, 0.1),
                    m.running_var.uniform_(0.5, 1.5),
                )
    return model


def silence(model: torch.nn.Module, groups: dict, keep: dict[str, list[int]]) -> torch.nn.Module:
    """Zero, in `model`, the weights and norms of every channel a plan keeping `keep` removes."""
    with torch.no_grad():
        for name, kept in keep.items():
            group = groups[name]
            for layer in [*group.layers, *group.norms]:
                module, rows = model.get_submodule(layer), group.rows.get(layer)
                dropped = [r for i in range(group.size) if i not in kept for r in (rows[i] if rows else [i])]
                module.weight[dropped] = 0
                if module.bias is not None:
                    module.bias[dropped] = 0
    return model.eval()


def pruned_and_reloaded(
    model: torch.nn.Module, shape: tuple[int, int, int], target: float | None, tmp_path
) -> torch.nn.Module:
    """Prune `model` with L1 scores to `target` of its FLOPs (None: half of every group), save and reload;
    the reload must compute the same."""
    from prunelab.budget import count_flops, keep_count, plan_by_counts, search_threshold, tie_scores
    from prunelab.export import load_model, save_model
    from prunelab.structure import apply_channel_plan, channel_groups, group_weights, model_record

    dense = count_flops(model, shape)
    groups = channel_groups(model, shape)
    scores = tie_scores(
        {g.name: sum(w.detach().abs().flatten(1).sum(1) for w in group_weights(model, g)) for g in groups}, groups
    )
    if target is None:
        counts = {g.name: keep_count(g.size // 2, g.size, 1, g.unit, g.multiple) for g in groups}
        plan = plan_by_counts(scores, counts, {g.name: g.unit for g in groups}, {g.name: g.blocks for g in groups})
    else:
        plan, ratio = search_threshold(model, scores, target, shape, tolerance=0.05)
    apply_channel_plan(model, plan, shape)
    if target is not None:
        assert count_flops(model, shape) / dense == pytest.approx(ratio) == pytest.approx(target, rel=0.05)
    model_record(model).input_shape = shape
    reloaded = load_model(save_model(model, tmp_path / "model.pt")).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reloaded(x))
    return model


def equals_silenced_dense_and_reloads(model: torch.nn.Module, dense: torch.nn.Module, tmp_path) -> torch.Tensor:
    """The pruned `model` computes what `dense` (with the removed channels silenced) does, and reloads bit-equal."""
    from prunelab.export import load_model, save_model
    from prunelab.structure import model_record

    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    model_record(model).input_shape = SHAPE
    reloaded = load_model(save_model(model, tmp_path / "model.pt")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    return x


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the machine's other jobs for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
