"""The results guard: each method's quick configuration run on real data, its figures beside the reference.

A reference file (JSON) names, for every entry, the command-line overrides of one run and the figures it
gave: a hash of the plans its prune stages decided (the kept channels of a ChannelPlan, the bits of a
MaskPlan), the FLOPs and parameter ratios, the weight sparsity and the test accuracy, with the tolerance
of each. `python -m prunelab.guard` runs them (one torch thread each, so that a run gives the same bits
on every machine of a kind, several runs side by side) and prints every figure beside its reference;
it exits 1 when one is off by more than its tolerance. The plan hash has none: a method that decides
anything else has moved, and the commit that moves it says why and runs `--update`.

The accuracy's tolerance is fitted to how far the entry's accuracy moves with its batches alone:
`--spread 1,2` runs every entry again at those seeds and writes, beside the reference, the accuracies
of seeds 0, 1, 2 and a tolerance of twice their standard deviation (at least `MIN_ACC_TOLERANCE`).

Overrides may hold `{shared}`, the folder of the project's read-only data and weights (`--shared`);
without it the guard stops in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The figures of a run, read from its summary.json (and its plans), with their default tolerances.
FIGURES = {
    "plan": None,
    "model/flops_ratio": 1e-4,
    "model/params_ratio": 1e-4,
    "model/sparsity": 1e-4,
    "test/acc": 0.5,
}
# The least accuracy tolerance (points): a same-plan run whose training rounds otherwise moves about this much.
MIN_ACC_TOLERANCE = 0.5
# Settings every guarded run shares: no latency timing (machine noise, not a result), no progress bars.
COMMON = ["latency.batch_sizes=[]", "trainer.enable_progress_bar=false", "quiet=true"]
# Settings with which each method's run finishes in one batch or a few steps, on any data: the smoke runs (every
# method's one-batch pipeline test, benchmarks/ddp_check.py). A method without an entry needs none.
FEW_STEPS = {
    "pfs": ["method.epochs=1"],
    "jackpot": ["method.epochs=1"],
    "edge_popup": ["method.epochs=1"],
    "imp": ["method.rounds=2"],
    "synflow": ["method.iterations=2"],
    # beta_T = 200 reached within 3 steps makes the mask a step function that amplifies rounding
    # 1000x per step (measured: 5e-4 after one step); beta_T = 2 keeps the DDP check about DDP.
    "cs": ["method.rounds=2", "method.final_beta=2"],
    "greedy": ["method.epsilon=10", "method.max_steps=0.5", "method.taylor_after=1"],
    "concave": ["method.rounds=2", "method.selection=fixed_fraction", "method.prune_fraction=0.5"],
    "slimming": ["method.sparsity_epochs=1"],
    # Masks change after every step (the default waits 100 steps, or an epoch for SET).
    "set": ["method.update_every=1"],
    "rigl": ["method.update_every=1"],
    "greg1": ["method.delta_lambda=0.5", "method.update_interval=1", "method.stabilize_steps=1"],
    "greg2": [
        "method.delta_lambda=0.5",
        "method.delta_lambda_pick=0.5",
        "method.tau0=0.6",
        "method.update_interval=1",
        "method.stabilize_steps=1",
    ],
}


@dataclass
class Outcome:
    """One entry's run: its figures, how long it took, and the error it ended with, if any."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def plan_hash(run_dir: Path) -> str | None:
    """A hash of every plan the run's prune stages decided, in stage order (None: the run pruned nothing)."""
    stages = json.loads((run_dir / "stages.json").read_text())
    digest, found = hashlib.sha1(), False
    for stage in stages:
        directory = run_dir / "stages" / stage["dir"]
        masks, plan = directory / "masks.pt", directory / "plan.json"
        if masks.exists():
            payload = torch.load(masks, map_location="cpu", weights_only=True)["masks"]
            for name in sorted(payload):
                digest.update(name.encode())
                digest.update(payload[name].to(torch.bool).numpy().tobytes())
            found = True
        elif plan.exists():
            keep = json.loads(plan.read_text()).get("keep")
            digest.update(json.dumps(keep, sort_keys=True).encode())
            found = True
    return digest.hexdigest()[:16] if found else None


def figures(run_dir: Path) -> dict[str, Any]:
    """The guarded figures of a finished run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    out: dict[str, Any] = {"plan": plan_hash(run_dir)}
    for key in FIGURES:
        if key != "plan" and summary.get(key) is not None:
            out[key] = round(float(summary[key]), 6)
    return out


def run_entry(name: str, overrides: list[str], out_dir: Path, shared: Path, seed: int | None = None) -> Outcome:
    """Run one entry through the `prunelab` command in a fresh run directory, on one torch thread."""
    run_dir = out_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [o.replace("{shared}", str(shared)) for o in overrides] + COMMON + [f"hydra.run.dir={run_dir}"]
    if seed is not None:
        args.append(f"seed={seed}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prunelab.cli", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Outcome(name, seconds=seconds, error=f"exit {done.returncode}: {last}")
    return Outcome(name, figures(run_dir), seconds)


def compare(
    measured: dict[str, Any], reference: dict[str, Any], tolerances: dict[str, float] | None = None
) -> list[tuple[str, Any, Any, bool]]:
    """(figure, measured, reference, within tolerance) for every figure of the reference."""
    tolerances = {**{k: v for k, v in FIGURES.items() if v is not None}, **(tolerances or {})}
    rows = []
    for key, expected in reference.items():
        got = measured.get(key)
        if key in tolerances and isinstance(expected, (int, float)) and isinstance(got, (int, float)):
            ok = abs(got - expected) <= tolerances[key]
        else:
            ok = got == expected
        rows.append((key, got, expected, ok))
    return rows


def load_reference(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text())["entries"]


def check(
    path: Path,
    shared: Path,
    names: list[str] | None = None,
    jobs: int = 2,
    out_dir: Path | None = None,
    update: bool = False,
    spread: list[int] | None = None,
) -> tuple[bool, list[Outcome]]:
    """Run the entries (all, or `names`), print the table; returns (all within tolerance, outcomes).

    With `spread` (seeds other than 0), every entry also runs at those seeds, and the reference file gets each entry's
    accuracies by seed and an accuracy tolerance fitted to them (`fit_tolerance`)."""
    document = json.loads(path.read_text())
    entries = document["entries"]
    unknown = [n for n in names or [] if n not in entries]
    if unknown:
        raise SystemExit(
            f"prunelab.guard: error: no entry {', '.join(unknown)} in {path} (entries: {', '.join(entries)})"
        )
    if not shared.exists():
        raise SystemExit(
            f"prunelab.guard: error: {shared} not found: the guard runs on the project's shared data (--shared DIR)"
        )
    chosen = names or list(entries)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="prunelab-guard-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    runs = [(n, None) for n in chosen] + [(n, s) for s in spread or [] for n in chosen]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = list(
            pool.map(
                lambda r: run_entry(
                    r[0] if r[1] is None else f"{r[0]}-seed{r[1]}", entries[r[0]]["overrides"], out_dir, shared, r[1]
                ),
                runs,
            )
        )
    elapsed = time.perf_counter() - start
    outcomes = done[: len(chosen)]
    ok = _print(outcomes, entries)
    print(
        f"{len(runs)} runs ({len(outcomes)} entries{f' at {len(spread or []) + 1} seeds' if spread else ''}) in "
        f"{elapsed / 60:.1f} min with {jobs} at a time, one torch thread each; "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores); "
        f"run directories and logs in {out_dir}"
    )
    if update:
        for outcome in outcomes:
            if outcome.error is None:
                entries[outcome.name]["figures"] = outcome.figures
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"{path} updated: say in the commit why these figures moved")
    if spread:
        by_seed = {n: {0: o} for n, o in zip(chosen, outcomes)}
        for (name, seed), outcome in zip(runs[len(chosen) :], done[len(chosen) :]):
            by_seed[name][seed] = outcome
        for name, seeds in by_seed.items():
            failed = [f"seed {s}: {o.error}" for s, o in seeds.items() if o.error is not None]
            if failed:
                print(f"{name}: no spread written ({'; '.join(failed)})")
                continue
            accs = {str(s): o.figures["test/acc"] for s, o in sorted(seeds.items())}
            entries[name]["spread"] = {"test/acc": accs}
            entries[name].setdefault("tolerance", {})["test/acc"] = fit_tolerance(list(accs.values()))
            print(f"{name}: test/acc by seed {accs}, tolerance {entries[name]['tolerance']['test/acc']}")
        path.write_text(json.dumps(document, indent=1) + "\n")
    return ok, outcomes


def fit_tolerance(accuracies: list[float]) -> float:
    """The accuracy tolerance from one entry's accuracies at several seeds: twice their sample standard deviation (one
    run of a changed method falls that close to its old mean about 95 times in 100 where only the batches moved it),
    at least `MIN_ACC_TOLERANCE`, rounded up to a tenth of a point."""
    import math
    import statistics

    return max(MIN_ACC_TOLERANCE, math.ceil(20 * statistics.stdev(accuracies)) / 10)


def _print(outcomes: list[Outcome], entries: dict[str, dict[str, Any]]) -> bool:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="results guard")
    for column in ("entry", "figure", "measured", "reference", "tolerance", "", "seconds"):
        table.add_column(column, justify="left" if column in ("entry", "figure") else "right")
    all_ok = True
    for outcome in outcomes:
        entry = entries[outcome.name]
        if outcome.error is not None:
            all_ok = False
            table.add_row(outcome.name, "run", outcome.error, "", "", "FAIL", f"{outcome.seconds:.0f}")
            continue
        rows = compare(outcome.figures, entry.get("figures", {}), entry.get("tolerance"))
        if not rows:
            table.add_row(
                outcome.name, "(no reference)", json.dumps(outcome.figures), "", "", "NEW", f"{outcome.seconds:.0f}"
            )
            all_ok = False
        tolerances = {**FIGURES, **entry.get("tolerance", {})}
        for i, (key, got, expected, ok) in enumerate(rows):
            all_ok = all_ok and ok
            tolerance = "exact" if tolerances.get(key) is None else f"{tolerances[key]:g}"
            table.add_row(
                outcome.name if i == 0 else "",
                key,
                _fmt(got),
                _fmt(expected),
                tolerance,
                "ok" if ok else "MOVED",
                f"{outcome.seconds:.0f}" if i == 0 else "",
            )
    Console(width=140).print(table)
    return all_ok


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path("tests/reference_results.json"))
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="the shared data and weights folder")
    parser.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one torch thread each)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where the run directories go (default: a temporary folder)"
    )
    parser.add_argument("--update", action="store_true", help="write the measured figures into the reference file")
    parser.add_argument(
        "--spread", default="", help="comma-separated seeds besides 0: run them too and fit the accuracy tolerance"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or None
    try:
        spread = [int(s) for s in args.spread.split(",") if s]
    except ValueError:
        parser.error(f"--spread takes seeds such as 1,2; got {args.spread!r}")
    if 0 in spread:
        parser.error("--spread: seed 0 is the reference run itself; give the other seeds")
    ok, _ = check(args.reference, args.shared.resolve(), names, args.jobs, args.out, args.update, spread)
    return 0 if ok or args.update else 1


if __name__ == "__main__":
    sys.exit(main())
