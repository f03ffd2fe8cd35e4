"""The `prunelab` command as a user runs it: help, printed config, bad names, runs and grids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, run_cli, shared_path


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


# The README's first command, so it stays in `make test` (37 s alone on the idle 2-core machine).
def test_quickstart_preset_prunes_and_prints_before_after_table(tmp_path):
    out = run_cli(
        "experiment=l1_filter_resnet20_digits_quickstart",
        "pretrain.epochs=3",
        "retrain.epochs=1",
        "latency.repeats=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for row in (
        "accuracy (%)",
        "FLOPs (MACs)",
        "parameters",
        "latency batch 1 (ms, eager)",
        "latency batch 64 (ms, deployed)",
        "deployed (torchscript_frozen",
    ):
        assert row in out.stdout, row
    assert (
        "timing the final and the dense model, eager and as torchscript_frozen, at batch sizes [1, 64]"
        in out.stdout + out.stderr
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model/flops_ratio"] == pytest.approx(0.5, rel=0.02)
    assert summary["dense/test/acc"] > 50.0  # three epochs on real digits already clear chance (10%) by far
    assert (tmp_path / "run" / "model.ts").exists() and (tmp_path / "run" / "model.pt").exists()


def test_user_config_folder_on_hydra_searchpath(tmp_path):
    """A config folder of the user's own, added with hydra.searchpath, offers new choices in a group."""
    method_dir = tmp_path / "my_conf" / "method"
    method_dir.mkdir(parents=True)
    (method_dir / "mine.yaml").write_text("_target_: prunelab.methods.baselines.L1Filter\nnormalize: false\n")
    searchpath = f"hydra.searchpath=['{(tmp_path / 'my_conf').as_uri()}']"
    out = run_cli("--cfg", "job", searchpath, "method=mine", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    method = yaml.safe_load(out.stdout)["method"]
    assert method == {"_target_": "prunelab.methods.baselines.L1Filter", "normalize": False}


# Run inside the installed copy: where the package and its configs come from, and one preset's text.
INSTALLED_CHECK = """
import json
from importlib import resources

import prunelab.cli

preset = resources.files("prunelab.conf").joinpath("experiment/imp_resnet20_cifar10.yaml")
found = {"package": prunelab.cli.__file__, "conf": str(prunelab.cli.CONF_DIR), "preset": preset.read_text()}
print(json.dumps(found))
"""


def source_files(folder: Path) -> set[str]:
    """The Python modules and YAML configs under `folder`, as paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix in {".py", ".yaml"}}


def test_non_editable_install_runs_from_another_directory(tmp_path):
    """`pip install .` (not editable) gives a `prunelab` that needs nothing from the source checkout.

    The package is built from a copy of the project's files, so the checkout gets no build folder, and
    installed without its dependencies into a folder of its own: the tests' environment supplies those.
    """
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=skip)
    shutil.copytree(ROOT / "conf", source / "conf", ignore=skip)
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(ROOT / name, source / name)
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--no-cache-dir", "--target", str(target), str(source)]
    out = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    # Every module and every config ships: the package list in pyproject.toml is complete.
    package = target / "prunelab"
    conf = {f"conf/{name}" for name in source_files(source / "conf")}
    assert source_files(package) == source_files(source / "src" / "prunelab") | conf

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PRUNELAB_OUTPUTS": str(elsewhere / "outputs")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)

    # The installed copy is what gets imported, configs included, not the checkout's src/ and conf/.
    out = run(sys.executable, "-c", INSTALLED_CHECK)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["package"]).is_relative_to(package)
    assert Path(found["conf"]) == package / "conf"
    assert found["preset"] == (source / "conf" / "experiment" / "imp_resnet20_cifar10.yaml").read_text()

    out = run(sys.executable, "-m", "prunelab.cli", "--help")
    assert out.returncode == 0, out.stderr
    for group in ["dataset", "backbone", "method", "experiment"]:
        assert f"{group}:" in out.stdout, group
    assert "imp_vgg11_cifar100" in out.stdout and "l1_filter" in out.stdout

    # The console script, with a preset that builds on another preset.
    out = run(str(target / "bin" / "prunelab"), "--cfg", "job", "experiment=imp_vgg11_cifar100")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["backbone"]["name"] == "vgg11" and cfg["dataset"]["_target_"].endswith("CIFAR100DataModule")
    assert cfg["method"]["rounds"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=l1_filter", "budget.flops=1.5"], "budget.flops=1.5 is out of range"),
        (["backbone.width=-1"], "backbone.width=-1 is out of range"),
        (["objective=test/acc"], "sweeps must not tune on the test set"),
        (["dataset=cifar10", "dataset.root=/no/such/dir"], "CIFAR-10 not found"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    out = run_cli(*FAST, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("prunelab: error: ") and message in lines[0]
    assert "Traceback" not in out.stdout + out.stderr


def test_full_error_shows_the_traceback_and_bugs_keep_theirs(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PRUNELAB_OUTPUTS": str(tmp_path / "outputs")}
    out = subprocess.run(
        [sys.executable, "-m", "prunelab.cli", *FAST, "backbone.width=-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr
    # A method without the interface is a bug, not a user error: traceback, exit code 1.
    bug = run_cli(*FAST, "method._target_=builtins.dict", cwd=tmp_path)
    assert bug.returncode == 1 and "prunelab: error:" not in bug.stderr and "AttributeError" in bug.stderr


def test_a_terminated_run_exits_143_not_0(tmp_path):
    """SIGTERM (preemption, `kill`) must not end with exit code 0 as if the run had finished."""
    import signal
    import time

    env = {**os.environ, "PRUNELAB_OUTPUTS": str(tmp_path / "outputs")}
    command = [sys.executable, "-m", "prunelab.cli", *FAST, "trainer.max_epochs=200", "latency.batch_sizes=[]"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("outputs/runs/*/stages/*/checkpoints/last.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "prunelab: error: stopped by SIGTERM" in stderr
    (run_dir,) = tmp_path.glob("outputs/runs/*")
    assert not (run_dir / "summary.json").exists()


def test_a_run_directory_refuses_another_experiment_and_resumes_its_own(tmp_path):
    """The issue's two commands on one hydra.run.dir: the second is refused before any work, D untouched;
    the first again, with only what is printed or logged changed, resumes without training."""
    run_dir = tmp_path / "D"
    common = [*FAST, "budget.flops=0.5", "latency.batch_sizes=[]", f"hydra.run.dir={run_dir}"]
    first = run_cli(*common, "method=l1_filter", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = (run_dir / "summary.json").read_bytes()
    files = sorted(run_dir.rglob("*"))
    stamps = {
        p: p.stat().st_mtime_ns for p in files if p.is_file() and p.parent.name != ".hydra" and p.suffix != ".log"
    }

    other = run_cli(*common, "method=random", cwd=tmp_path)
    assert other.returncode == 2, other.stderr[-2000:]
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"prunelab: error: run directory {run_dir} holds another experiment: "
    )
    assert (
        "method._target_ (prunelab.methods.baselines.L1Filter here, prunelab.methods.baselines.Random asked)"
        in lines[0]
        and f"delete {run_dir} to start over" in lines[0]
    )
    # Refused before anything was built: no stage started, and no file of D was written again.
    assert "starting" not in other.stdout + other.stderr and "Traceback" not in other.stderr
    assert (run_dir / "summary.json").read_bytes() == summary
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "L1Filter" in (run_dir / "config.yaml").read_text()

    again = run_cli(*common, "method=l1_filter", "quiet=true", "logger=tensorboard", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    done = {p: t for p, t in stamps.items() if p.name in ("done.json", "last.ckpt")}
    assert len(done) == 4 and {p: p.stat().st_mtime_ns for p in done} == done
    assert list((run_dir / "tensorboard").rglob("events.*"))
    before, after = json.loads(summary), json.loads((run_dir / "summary.json").read_text())
    assert {k: v for k, v in after.items() if not k.startswith("time/")} == {
        k: v for k, v in before.items() if not k.startswith("time/")
    }


def test_a_renamed_preset_stops_in_one_line_naming_the_new_one(tmp_path):
    out = run_cli("experiment=pfs_quick", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "prunelab: error: experiment=pfs_quick was renamed experiment=pfs_resnet20_digits_quick "
        "(presets are named <method>_<backbone>_<dataset>[_<variant>])"
    ]
    assert not (tmp_path / "run").exists()
    # In a multirun list too, and from Python.
    out = run_cli("-m", "experiment=jackpot_resnet32_cifar10,greg_table1_resnet56_cifar10", cwd=tmp_path)
    assert out.returncode == 2 and "renamed experiment=greg1_resnet56_cifar10_table1" in out.stderr
    from prunelab.api import compose_config
    from prunelab.validate import ConfigError

    with pytest.raises(ConfigError, match="renamed experiment=l1_filter_resnet20_digits_quickstart"):
        compose_config("l1_filter", {}, ["experiment=quickstart"])


def test_every_preset_is_named_method_backbone_dataset():
    from prunelab.cli import CONF_DIR
    from prunelab.presets import RENAMED

    presets = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert len(presets) == 117 and not set(RENAMED) & set(presets) and set(RENAMED.values()) <= set(presets)
    methods = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    backbones = {p.stem for p in (CONF_DIR / "backbone").glob("*.yaml")} | {"mobilenet_v3_small"}
    datasets = {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")}
    for name in presets:
        method = next(m for m in sorted(methods, key=len, reverse=True) if name.startswith(m + "_"))
        rest = name[len(method) + 1 :]
        backbone = next((b for b in sorted(backbones, key=len, reverse=True) if rest.startswith(b + "_")), None)
        assert backbone is not None, name
        assert any(rest[len(backbone) + 1 :] == d or rest[len(backbone) + 1 :].startswith(d + "_") for d in datasets), (
            name
        )
