"""What greedy imitation's search costs, in dense training epochs, and what the Taylor speed-up saves.

Offline, on scikit-learn's digits (`dataset=digits`) and a CIFAR ResNet-20 at `--width`: each run trains
the dense network (`pretrain.epochs`), then prunes it layer by layer with one `method.epsilon` in each of
the modes below, and tests it right after pruning (no fine-tuning). The search's wall time is compared
with one epoch of the same run's dense training by `prunelab.report.search_cost` (what `python -m prunelab.report
cost RUN RUN --search-stage prune --dense-stage pretrain` prints; written to each run's search_cost.json):

    local            local imitation only (one forward pass per step serves every candidate)
    global           global imitation, every candidate evaluated exactly (one forward pass each)
    global+taylor    global imitation with the paper's speed-up: after 25 steps, candidates ranked by
                     the Taylor score (one backward pass), the top 5 evaluated exactly
    both+taylor      Algorithm 2: both per layer, the one that keeps fewer neurons

    python experiments/greedy/greedy_cost.py [--epsilon 0.05] [--width 1.0] [--pretrain-epochs 10]

Every run keeps its directory under `--out`, so a killed script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import prunelab
from prunelab.io import write_json
from prunelab.report import find_runs, search_cost

ROOT = Path(__file__).resolve().parents[2]
MODES = {
    "local": ["method.mode=local"],
    "global": ["method.mode=global", "method.taylor_after=null"],
    "global+taylor": ["method.mode=global", "method.taylor_after=25", "method.taylor_top=5"],
    "both+taylor": ["method.mode=both", "method.taylor_after=25", "method.taylor_top=5"],
}


def run(args: argparse.Namespace, mode: str) -> Path:
    run_dir = args.out / mode.replace("+", "_")
    if not (run_dir / "summary.json").exists():
        overrides = [
            "dataset=digits", "backbone=resnet20", f"backbone.width={args.width}",
            "method=greedy", f"method.epsilon={args.epsilon}", *MODES[mode], f"pretrain.epochs={args.pretrain_epochs}",
            "optimizer.lr=0.05", "retrain=none", "test_pruned=true", "budget.prune_coupled=false",
            "latency.batch_sizes=[]", "trainer.enable_progress_bar=false", "quiet=true", f"seed={args.seed}",
        ]  # fmt: skip
        print("prunelab", *overrides, f"hydra.run.dir={run_dir}", flush=True)
        prunelab.run(overrides, run_dir)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "greedy_cost")
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        run_dir = run(args, mode)
        (found,) = find_runs([run_dir])
        cost = search_cost(found, found, "prune", "pretrain")
        write_json(run_dir / "search_cost.json", cost, indent=1)
        layers = json.loads((run_dir / "greedy_layers.json").read_text())["layers"]
        rows.append((mode, cost, found.summary, sum(r["steps"] for r in layers)))
    print(
        f"\nResNet-20 x{args.width:g} on digits, epsilon {args.epsilon:g}, seed {args.seed}; "
        f"dense accuracy {rows[0][2]['dense/test/acc']:.2f}%"
    )
    print("| mode | search (s) | in dense epochs | steps | FLOPs kept | accuracy after pruning (%) |")
    print("|---|---|---|---|---|---|")
    for mode, cost, summary, steps in rows:
        print(
            f"| {mode} | {cost['search_s']:.1f} | {cost['search_in_dense_epochs']:.1f} | {steps} | "
            f"{summary['model/flops_ratio']:.3f} | {summary['pruned/test/acc']:.2f} |"
        )
    print(f"one dense epoch: {rows[0][1]['dense_epoch_s']:.2f} s")


if __name__ == "__main__":
    main()
