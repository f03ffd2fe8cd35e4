"""IMP, concave-l1, concave-log and continuous sparsification on ResNet-20, rounds shortened for a CPU.

Runs the paper presets (`experiment=imp_resnet20_cifar10`, `concave_{l1,log}_resnet20_cifar10`,
`cs_resnet20_cifar10`: 3 rounds with rewinding to the initialisation, SGD 0.1 / 0.9 / 1e-4, batch 128)
with `--epochs` epochs per round instead of 85 (lr drops scaled to 56/85 and 71/85 of them), on the real
CIFAR-10 subset in ../shared (5,170 training images: 41 steps per epoch), and prints the sparsity and the
test accuracy of every round's ticket (trained in isolation from the rewound weights), mean +- std over
the seeds, through the rounds report (`python -m prunelab.report rounds`, table and plot in --out).

Deviation: a round here is about 400 times shorter than the paper's (85 epochs of 391 steps), and the
masks move in proportion to the steps taken, so lambda is multiplied by the ratio of the paper's
optimizer steps to ours (`--lam-scale`, default: that ratio) to give the regulariser the same total
pull; everything else is the preset's. `--fixed-fraction` adds concave-log pruning 20% per round by mask
value (the paper's Fig. 8 ablation, the same sparsities as IMP).

    python scripts/concave_vs_imp.py --epochs 2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar-10-subset"
PAPER_STEPS = 85 * 391  # a ResNet-20 round in the paper: 85 epochs of 50,000 images at batch 128


def runs(args: argparse.Namespace) -> dict[str, list[str]]:
    steps = args.epochs * -(-5170 // 128)
    scale = args.lam_scale if args.lam_scale is not None else PAPER_STEPS / steps
    found = {
        "imp": ["experiment=imp_resnet20_cifar10"],
        "concave-l1": ["experiment=concave_l1_resnet20_cifar10", f"method.lam={3e-6 * scale:.3g}"],
        "concave-log": ["experiment=concave_log_resnet20_cifar10", f"method.lam={1e-6 * scale:.3g}"],
        "cs": ["experiment=cs_resnet20_cifar10", f"method.lam={1e-8 * scale:.3g}"],
    }
    if args.fixed_fraction:
        found["concave-log-fixed"] = [*found["concave-log"], "method.selection=fixed_fraction"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per round (search and ticket training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lam-scale", type=float, default=None, help="multiply the presets' lambda (default: paper steps / ours)")
    parser.add_argument("--fixed-fraction", action="store_true", help="also concave-log with 20%% per round by mask value")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "concave_vs_imp")
    args = parser.parse_args()
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} not found: run beside the shared folder")
    milestones = f"[{round(args.epochs * 56 / 85)},{round(args.epochs * 71 / 85)}]"
    common = [f"dataset.root={CIFAR}", f"dataset.num_workers={args.workers}", f"trainer.max_epochs={args.epochs}",
              f"scheduler.milestones={milestones}", "trainer.enable_progress_bar=false", "latency.batch_sizes=[]",
              "test_pruned=true", "quiet=true"]
    env = {**os.environ, "PRUNELAB_OUTPUTS": str(args.out)}
    log = (args.out / "log.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in runs(args).items():
        for seed in args.seeds:
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "prunelab.cli", *overrides, *common, f"seed={seed}"]
            with log.open("a") as out:
                if subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise SystemExit(f"{name} seed {seed} failed; see {log}")
            print(f"{name} seed {seed}: {time.perf_counter() - start:.0f} s   ({' '.join(overrides)})", flush=True)

    from prunelab.report import find_runs, mean_std, rounds_markdown, rounds_table

    found = find_runs([args.out / "runs"])
    by = ["method", "method.regularizer", "method.selection"]
    print(rounds_markdown(rounds_table(found, by=by, out=args.out), by), end="")
    # The search's own network (m * theta, fixed entries removed) right after each prune, before any training.
    print("\nsearch network right after each prune (round<r>/pruned/test/acc), mean +- std over seeds:")
    for key in sorted({tuple(str(run.get(k)) for k in by) for run in found}):
        group = [run for run in found if tuple(str(run.get(k)) for k in by) == key]
        cells = []
        for r in (1, 2, 3):
            values = [run.summary[f"round{r}/pruned/test/acc"] for run in group if f"round{r}/pruned/test/acc" in run.summary]
            cells.append(f"round {r}: {mean_std(values)}" if values else f"round {r}: -")
        print(f"  {' '.join(key)}: {'; '.join(cells)}")
    times = {run.path.name: {k: v for k, v in run.summary.items() if k.startswith("time/")} for run in found}
    (args.out / "times.json").write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
