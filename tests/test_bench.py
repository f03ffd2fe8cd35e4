"""`prunelab-bench`: protocols compose into grids, a grid runs with its controls and resumes, mistakes are refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR

from prunelab import bench
from prunelab.errors import ConfigError

PROTOCOLS = sorted(p.stem for p in (CONF_DIR / "protocol").glob("*.yaml"))
# Any protocol shrunk to the tests' scale: synthetic data, the tiny ResNet, one seed, one short epoch, no timing.
TINY = [
    "protocol.dataset=['dataset=synthetic','dataset.train_size=64','dataset.val_size=16','dataset.test_size=32']",
    "protocol.backbone=['backbone=resnet_tiny']",
    "protocol.seeds=[0]",
    "protocol.finetune.epochs=1",
    "protocol.common=['trainer.enable_progress_bar=false','quiet=true','latency.batch_sizes=[]']",
]


def _cells(out: Path) -> dict[str, dict]:
    """Each finished cell's summary, by cell."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/summary.json"))}


def test_every_protocol_composes_into_its_grid():
    """Every shipped protocol composes onto the schema, and its grid has a cell per method, budget and seed, one per
    control of each, and a dense control per seed, each with the protocol's overrides."""
    assert {"cpu_resnet56_cifar10_2x", "cpu_resnet20_cifar10_90", "cifar10_resnet56"} <= set(PROTOCOLS)
    for name in PROTOCOLS:
        cfg = bench.load([f"protocol={name}"])
        protocol = cfg.protocol
        grid = bench.cells(cfg)
        per_method = [c for c in protocol.controls if c != "dense_finetune"]
        dense = 1 if "dense_finetune" in protocol.controls else 0
        expected = len(protocol.seeds) * (dense + len(protocol.budgets) * len(protocol.methods) * (1 + len(per_method)))
        assert len(grid) == expected, name
        assert len({c.cell for c in grid}) == len(grid)
        for cell in grid:
            assert f"seed={cell.seed}" in cell.overrides
            assert set(protocol.dataset) <= set(cell.overrides)
            if cell.control is None:
                assert set(protocol.methods[cell.method]) <= set(cell.overrides)
                assert set(protocol.budgets[cell.budget]) <= set(cell.overrides)
                assert f"retrain.epochs={protocol.finetune.epochs}" in cell.overrides
            elif cell.control != "dense_finetune":
                source = str(Path(cfg.out) / "cells" / cell.of)
                assert f"method.source='{source}'" in cell.overrides
                assert "method=control" in cell.overrides


def test_every_protocol_checks_at_tiny_scale():
    """Every cell of every protocol (full-scale ones included) composes and passes the command's checks once the
    data and backbone are tiny: the settings the protocols give each method exist and are in range."""
    for name in PROTOCOLS:
        cfg = bench.load([f"protocol={name}", *TINY])
        # A cell the command would refuse raises its one-line ConfigError here, failing the test.
        bench.check(cfg, bench.cells(cfg))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "You must specify 'protocol', e.g, protocol=<OPTION> Available options: cifar10_resnet20_unstructured"),
        (["protocol=nope"], "Could not find 'protocol/nope'"),
        (
            ["protocol=cpu_resnet56_cifar10_2x", "protocol.controls=[random_mask]"],
            "random_mask is not a control of a structured",
        ),
        (["protocol=cpu_resnet56_cifar10_2x", "protocol.controls=[sideways]"], "protocol.controls"),
        (["protocol=cpu_resnet56_cifar10_2x", "only=[nope]"], "only: 'nope' is not a method of the protocol"),
        (["protocol=cpu_resnet56_cifar10_2x", "+protocol.methods.a__b=['method=l1_filter']"], "label 'a__b'"),
        (["protocol=cpu_resnet56_cifar10_2x", "protocol.seeds=[]"], "protocol.seeds is empty"),
        (["protocol=cpu_resnet56_cifar10_2x", "protocol.seeds=abc"], "protocol.seeds"),
        (["protocol=cpu_resnet56_cifar10_2x", "jobs=0"], "jobs must be at least 1"),
        (["protocol=cpu_resnet56_cifar10_2x", "protocol.sedes=[0]"], "protocol.sedes is not a setting"),
    ],
)
def test_mistakes_in_the_protocol_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        bench.load(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


BAD = "protocol.common=['budget.flopz=1']"


def test_a_bad_cell_setting_stops_before_any_cell_runs(tmp_path):
    """A cell the command would refuse (here an unknown budget key) stops the whole bench in one line, exit 2, before
    any cell is written."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "prunelab.bench", "protocol=cpu_resnet56_cifar10_2x", *TINY[:-1], f"out={out}", BAD],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("prunelab-bench: error: cell dense__s0: budget.flopz is not a setting")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _run_tiny(out: Path, *overrides: str, jobs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "prunelab.bench", *TINY, f"out={out}", f"jobs={jobs}", *overrides],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def test_structured_grid_runs_with_its_controls_and_reruns_nothing(tmp_path):
    """One method of the CPU protocol with every control: the controls keep the method's MACs exactly (random
    channels, Scratch-E) or train longer by its speedup (Scratch-B); a rerun runs no cell again, and a cell
    whose run was lost runs again to the same figures."""
    out = tmp_path / "bench"
    args = ["protocol=cpu_resnet56_cifar10_2x", "only=[l1]"]
    first = _run_tiny(out, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = _cells(out)
    # The report card has a row for the method and each of its controls, the method's own row timed.
    with open(out / "report" / "card.csv") as f:
        rows = {row["label"]: row for row in csv.DictReader(f)}
    assert {"l1", "l1 + random channels", "l1 Scratch-E", "l1 Scratch-B", "dense fine-tuned"} <= set(rows)
    assert float(rows["l1"]["top1 mean"]) == cells["l1__2x__s0"]["test/acc"]
    assert set(cells) == {
        "dense__s0",
        "l1__2x__s0",
        "l1__2x__s0__random_channels",
        "l1__2x__s0__scratch_e",
        "l1__2x__s0__scratch_b",
    }
    method = cells["l1__2x__s0"]
    assert method["model/flops_ratio"] == pytest.approx(0.5, abs=0.05)
    for control in ("random_channels", "scratch_e", "scratch_b"):
        assert cells[f"l1__2x__s0__{control}"]["model/flops"] == method["model/flops"]
    assert cells["dense__s0"]["model/flops_ratio"] == 1.0
    described = json.loads((out / "cells" / "l1__2x__s0__scratch_b" / "cell.json").read_text())
    assert described["control"] == "scratch_b" and described["of"] == "l1__2x__s0" and described["seed"] == 0

    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    lost = out / "cells" / "l1__2x__s0__random_channels"
    for path in lost.iterdir():
        if path.name != "cell.json":
            subprocess.run(["rm", "-rf", str(path)], check=True)
    again = _run_tiny(out, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "5 cells, 4 finished before, 1 to run" in again.stdout
    for path, stamp in stamps.items():
        if path.parent != lost:
            assert path.stat().st_mtime_ns == stamp
    assert _cells(out)["l1__2x__s0__random_channels"]["test/acc"] == cells["l1__2x__s0__random_channels"]["test/acc"]


def test_an_edited_protocol_does_not_mix_with_its_old_cells(tmp_path):
    out = tmp_path / "bench"
    args = ["protocol=cpu_resnet56_cifar10_2x", "only=[l1]", "controls=false", "report=false"]
    assert _run_tiny(out, *args).returncode == 0
    moved = _run_tiny(out, *args, "protocol.finetune.lr=0.05")
    assert moved.returncode == 2
    assert "cell l1__2x__s0" in moved.stderr and "was run with other settings" in moved.stderr


def test_unstructured_grid_and_parallel_cells_give_the_same_figures(tmp_path):
    """The unstructured CPU protocol's controls keep the method's sparsity exactly; two cells at a time, each in
    its own process, give the figures one process gives."""
    args = ["protocol=cpu_resnet20_cifar10_90", "only=[magnitude]", "report=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := _run_tiny(one, *args)).returncode == 0, done.stderr[-3000:]
    assert (done := _run_tiny(two, *args, jobs=2)).returncode == 0, done.stderr[-3000:]
    serial, parallel = _cells(one), _cells(two)
    assert set(serial) == {
        "dense__s0",
        "magnitude__90__s0",
        "magnitude__90__s0__random_mask",
        "magnitude__90__s0__reinit_mask",
    }
    assert set(parallel) == set(serial)
    for cell, summary in serial.items():
        for key in ("model/sparsity", "model/flops", "test/acc", "val/acc"):
            assert parallel[cell][key] == summary[key], (cell, key)
    sparsity = serial["magnitude__90__s0"]["model/sparsity"]
    assert sparsity == pytest.approx(0.9, abs=1e-3)
    for control in ("random_mask", "reinit_mask"):
        assert serial[f"magnitude__90__s0__{control}"]["model/sparsity"] == sparsity


def test_dry_run_prints_each_cells_command(tmp_path):
    cfg = bench.load(["protocol=cpu_resnet56_cifar10_2x", *TINY, f"out={tmp_path}"])
    grid = bench.cells(cfg)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunelab.bench",
            "protocol=cpu_resnet56_cifar10_2x",
            *TINY,
            f"out={tmp_path}",
            "dry_run=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(grid)
    assert all(" -m prunelab.cli " in line and "hydra.run.dir=" in line for line in lines)
    assert not (tmp_path / "cells").exists()
