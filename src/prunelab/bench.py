"""`prunelab-bench protocol=<name>`: a protocol's grid of methods x budgets x seeds, its controls, its report card.

A protocol (conf/protocol/<name>.yaml, typed by `prunelab.schema.ProtocolConfig`) fixes the dataset, the backbone
and its starting weights, the fine-tuning every method gets, the budgets, the seeds and the methods. Each cell of
the grid is one ordinary prunelab run (the `prunelab` command's path, `prunelab.api.run_config`) in
`<out>/cells/<cell>/`, beside a `cell.json` that says what it is. The controls are cells too, added for every
method cell: the same widths with random channels, Scratch-E and Scratch-B (`method=control` on the method cell's
run), the dense model fine-tuned alike; for unstructured protocols, a random mask of the same per-layer sparsity and
the same mask re-initialised. Every cell's config is composed and checked before the first one trains, so a mistake
stops the command in one line. A rerun skips finished cells and resumes a killed one; `jobs=N` runs N cells side by
side in their own processes. The report card (`prunelab.card`) is written to `<out>/report/` at the end.

    prunelab-bench protocol=cpu_resnet56_cifar10_2x
    prunelab-bench protocol=cpu_resnet56_cifar10_2x only=[l1] protocol.seeds=[0] jobs=2
    prunelab-bench protocol=cifar10_resnet56 dry_run=true     # the cells' commands, for a cluster's job array
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from prunelab import api, card
from prunelab.errors import ConfigError, PrunelabError, user_error
from prunelab.io import write_json, write_text
from prunelab.schema import Control

# The controls each kind of protocol may list: what a structured or an unstructured result is compared against.
CONTROLS = {
    "structured": {Control.random_channels, Control.scratch_e, Control.scratch_b, Control.dense_finetune},
    "unstructured": {Control.random_mask, Control.reinit_mask, Control.dense_finetune},
}
# A control of a method cell: the overrides of `method=control` on that cell's run (`{source}`), and the retraining.
_CONTROL_OVERRIDES = {
    Control.random_channels: ["method.pick=random"],
    Control.scratch_e: ["method.pick=same", "retrain=scratch"],
    Control.scratch_b: ["method.pick=same", "retrain=scratch_b"],
    Control.random_mask: ["method.pick=random"],
    Control.reinit_mask: ["method.pick=same", "retrain=scratch"],
}
# The controls are not timed: one with the method's widths (or masks) runs as fast as the method's model, the dense
# one as the dense model every method cell times beside its own.
NOT_TIMED = ["latency.batch_sizes=[]"]
# Labels become folder names: letters, digits, '.', '_' and '-'.
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Cell:
    """One run of a protocol: a method at a budget and seed, or a control of one (`of`: the cell it copies)."""

    cell: str
    method: str
    budget: str | None
    seed: int
    control: str | None
    of: str | None
    overrides: tuple[str, ...]


def load(overrides: Sequence[str]) -> DictConfig:
    """The `prunelab-bench` config for a command line's overrides, resolved; a mistake is a one-line ConfigError."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=api.CONF_MODULE, version_base="1.3"):
            try:
                cfg = compose("bench", overrides=list(overrides))
            except HydraException as err:
                raise ConfigError(api.composition_error(err)) from None
    finally:
        GlobalHydra.instance().clear()
    # Paths are made absolute, so that every cell (in this process or its own) reads the same files.
    cfg.shared = str(Path(cfg.shared).expanduser().resolve())
    OmegaConf.resolve(cfg)
    cfg.out = str(Path(cfg.out).expanduser().resolve())
    _check_protocol(cfg)
    return cfg


def _check_protocol(cfg: DictConfig) -> None:
    """What the protocol's types cannot say: labels usable as folder names, controls that fit its kind, known `only`."""
    protocol = cfg.protocol
    for field in ("methods", "budgets"):
        if not protocol[field]:
            raise ConfigError(f"protocol.{field} is empty: a protocol lists at least one")
        for label in protocol[field]:
            if not _LABEL.match(str(label)) or "__" in str(label):
                raise ConfigError(
                    f"protocol.{field} label {label!r}: letters, digits, '.', '_', '-' (no '__'): it names folders"
                )
    if not protocol.seeds:
        raise ConfigError("protocol.seeds is empty: a protocol runs at least one seed")
    allowed = CONTROLS[str(protocol.kind)]
    for control in protocol.controls:
        if control not in allowed:
            raise ConfigError(
                f"protocol.controls: {control} is not a control of a {protocol.kind} protocol "
                f"(choices: {', '.join(sorted(str(c) for c in allowed))})"
            )
    unknown = [m for m in cfg.only if m not in protocol.methods]
    if unknown:
        raise ConfigError(f"only: {unknown[0]!r} is not a method of the protocol ({', '.join(protocol.methods)})")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs must be at least 1; got {cfg.jobs}")


def cells(cfg: DictConfig) -> list[Cell]:
    """The protocol's cells in the order they run: seed by seed, the dense control, then each method cell followed
    by its controls (a control needs its method cell's finished run)."""
    protocol = cfg.protocol
    out = Path(cfg.out) / "cells"
    base = [*protocol.dataset, *protocol.backbone, *protocol.common]
    finetune = [f"retrain.epochs={protocol.finetune.epochs}", f"retrain.lr={protocol.finetune.lr}"]
    scratch_lr = protocol.scratch_lr if protocol.scratch_lr is not None else protocol.finetune.lr
    methods = [m for m in protocol.methods if not cfg.only or m in cfg.only]
    controls = [Control(str(c)) for c in protocol.controls] if cfg.controls else []
    found: list[Cell] = []
    for seed in protocol.seeds:
        tail = [f"seed={seed}", *cfg.extra]
        if Control.dense_finetune in controls:
            dense = [
                "method=dense",
                *NOT_TIMED,
                f"trainer.max_epochs={protocol.finetune.epochs}",
                f"optimizer.lr={protocol.finetune.lr}",
            ]
            found.append(
                Cell(f"dense__s{seed}", "dense", None, seed, str(Control.dense_finetune), None, (*base, *dense, *tail))
            )
        for budget, budget_overrides in protocol.budgets.items():
            for method in methods:
                name = f"{method}__{budget}__s{seed}"
                overrides = (*base, *finetune, *budget_overrides, *protocol.methods[method], *tail)
                found.append(Cell(name, method, budget, seed, None, None, overrides))
                source = api.override_value(str(out / name))
                for control in controls:
                    if control == Control.dense_finetune:
                        continue
                    lr = (
                        scratch_lr
                        if control in (Control.scratch_e, Control.scratch_b, Control.reinit_mask)
                        else protocol.finetune.lr
                    )
                    extra = [
                        "method=control",
                        f"method.source={source}",
                        *NOT_TIMED,
                        *_CONTROL_OVERRIDES[control],
                        f"retrain.epochs={protocol.finetune.epochs}",
                        f"retrain.lr={lr}",
                    ]
                    found.append(
                        Cell(f"{name}__{control}", method, budget, seed, str(control), name, (*base, *extra, *tail))
                    )
    return found


def check(cfg: DictConfig, grid: Sequence[Cell]) -> None:
    """Compose and check every cell's config (types, choices, ranges, files) before any cell runs."""
    for cell in grid:
        try:
            api.check_command(cell.overrides)
        except ConfigError as err:
            raise ConfigError(f"cell {cell.cell}: {err}") from None


def _claim(cell: Cell, run_dir: Path) -> bool:
    """Write the cell's description beside its run (True: the cell is finished already). A cell folder written by
    other overrides (the protocol was edited) is refused: its results would be mixed with the new ones."""
    path = run_dir / "cell.json"
    asked = asdict(cell)
    asked["overrides"] = list(cell.overrides)
    if path.exists():
        held = json.loads(path.read_text())
        if held.get("overrides") != asked["overrides"]:
            raise ConfigError(
                f"cell {cell.cell} in {run_dir.parent} was run with other settings; "
                f"give another out=... or delete that folder"
            )
    else:
        write_json(path, asked)
    return (run_dir / "summary.json").exists()


def _command(cell: Cell, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "prunelab.cli", *cell.overrides, f"hydra.run.dir={api.override_value(str(run_dir))}"]


def run_cell(cell: Cell, run_dir: Path, in_process: bool, threads: int) -> str | None:
    """Run one cell; None when it finished, else its error in one line (the grid goes on without it)."""
    if in_process:
        try:
            api.run(list(cell.overrides), run_dir)
        except Exception as err:  # noqa: BLE001 (one cell's failure, a bug included, is reported; the grid goes on)
            found = user_error(err)
            if found is not None:
                return str(found)
            write_text(run_dir / "error.txt", traceback.format_exc())
            return f"{type(err).__name__}: {err} (traceback in {run_dir / 'error.txt'})"
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "bench.log", "w") as log:
        done = subprocess.run(_command(cell, run_dir), env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode == 0:
        return None
    lines = (run_dir / "bench.log").read_text().strip().splitlines() or ["(no output)"]
    return f"exit {done.returncode}: {lines[-1]}"


def run_grid(cfg: DictConfig, grid: Sequence[Cell]) -> dict[str, str]:
    """Run the grid's unfinished cells (`cfg.jobs` at a time); the errors of the cells that failed, by cell."""
    out = Path(cfg.out) / "cells"
    todo = []
    for cell in grid:
        run_dir = out / cell.cell
        run_dir.mkdir(parents=True, exist_ok=True)
        if not _claim(cell, run_dir):
            todo.append(cell)
    print(f"prunelab-bench: {len(grid)} cells, {len(grid) - len(todo)} finished before, {len(todo)} to run in {out}")
    failed: dict[str, str] = {}
    start = time.perf_counter()
    # Each process gets its share of the cores, unless OMP_NUM_THREADS says how many.
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // cfg.jobs))
    done_count = 0

    def finish(cell: Cell, error: str | None) -> None:
        nonlocal done_count
        done_count += 1
        if error is not None:
            failed[cell.cell] = error
        elapsed = (time.perf_counter() - start) / 60
        status = "FAILED: " + error if error else "done"
        print(f"prunelab-bench: [{done_count}/{len(todo)}] {cell.cell} {status} ({elapsed:.1f} min)", flush=True)

    if cfg.jobs == 1:
        for cell in todo:
            if cell.of in failed:
                finish(cell, f"its method cell {cell.of} failed")
                continue
            finish(cell, run_cell(cell, out / cell.cell, in_process=True, threads=threads))
        return failed
    # Controls wait for their method cell; the rest start as workers free up.
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        running: dict[str, Future[str | None]] = {}
        for cell in todo:
            if cell.of is not None and cell.of in running:
                source = running[cell.of]
                running[cell.cell] = pool.submit(_after, source, cell, out / cell.cell, threads)
            else:
                running[cell.cell] = pool.submit(run_cell, cell, out / cell.cell, False, threads)
            running[cell.cell].add_done_callback(partial(_report, finish, cell))
    return failed


def _report(finish: Callable[[Cell, str | None], None], cell: Cell, future: Future[str | None]) -> None:
    finish(cell, future.result())


def _after(source: Future[str | None], cell: Cell, run_dir: Path, threads: int) -> str | None:
    """Run a control once its method cell has finished (a failed method cell fails its controls)."""
    if source.result() is not None:
        return f"its method cell {cell.of} failed"
    return run_cell(cell, run_dir, False, threads)


def main(argv: Sequence[str] | None = None) -> None:
    """The `prunelab-bench` command: run a protocol (or print its cells' commands), then write its report card."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    try:
        cfg = load(args)
        grid = cells(cfg)
        check(cfg, grid)
        out = Path(cfg.out)
        if cfg.dry_run:
            for cell in grid:
                print(shlex.join(_command(cell, out / "cells" / cell.cell)))
            return
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "protocol.yaml", OmegaConf.to_yaml(cfg.protocol))
        failed = run_grid(cfg, grid)
        if cfg.report:
            card.report_card(out, wandb=cfg.wandb or None)
            print(f"prunelab-bench: report card in {out / 'report' / 'card.md'}")
    except PrunelabError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"prunelab-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    if failed:
        print(f"prunelab-bench: {len(failed)} cells failed:", file=sys.stderr)
        for name, error in failed.items():
            print(f"  {name}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
