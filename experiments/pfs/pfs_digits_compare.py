"""Pruning from Scratch against uniform width and L1-norm filters, cheaply, on the bundled digits.

Every method prunes the same backbone to the same FLOPs budget and trains the result with the same
Scratch-B schedule; only how the structure is found differs:

- `pfs`: gates learned for a few epochs on the frozen, x1.25 random backbone (inner block channels);
- `uniform`: every layer thinned by the same fraction (the paper's "uniform" baseline);
- `l1_filter`: dense pre-training, then the filters of smallest L1 norm (inner block channels).

Runs go to `<root>/<method>-s<seed>` through `prunelab.run`, in this process (a finished run is skipped, a
killed one resumes); then `prunelab.report` writes `table.csv` (mean +- std of test accuracy over
seeds), the kept channels of every PFS seed (`channels.png`, Figure 3 of the paper), the structure
similarity of the PFS and L1 structures (`similarity.png`, Figure 2) and the search cost of PFS
against a dense epoch (`search_cost.json`, from the L1 runs' dense pre-training) into `<root>`.

Usage: python experiments/pfs/pfs_digits_compare.py [--seeds 0 1] [--root outputs/pfs_digits] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import prunelab
from prunelab import report

COMMON = [
    "dataset=digits",
    "backbone=resnet20",
    "backbone.width=0.5",
    "budget.flops=0.5",
    "budget.tolerance=0.02",
    "retrain=scratch_b",
    "retrain.epochs=5",
    "optimizer.lr=0.05",
    "latency.batch_sizes=[]",
    "trainer.enable_progress_bar=false",
]
METHODS = {
    "pfs": ["method=pfs", "method.epochs=5", "budget.prune_coupled=false"],
    "uniform": ["method=uniform", "budget.tolerance=0.05"],
    "l1_filter": ["method=l1_filter", "pretrain.epochs=5", "budget.prune_coupled=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--root", type=Path, default=Path("outputs/pfs_digits"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    for seed in args.seeds:
        for method in args.methods:
            run_dir = args.root / f"{method}-s{seed}"
            if (run_dir / "summary.json").exists():
                continue
            settings = [*COMMON, *METHODS[method], *args.overrides, f"seed={seed}"]
            print("+", *settings, f"hydra.run.dir={run_dir}", flush=True)
            prunelab.run(settings, run_dir)

    runs = report.find_runs([args.root])
    rows = report.table(runs, by=["method._target_"], out=args.root)
    for row in rows:
        name = row["method._target_"].rsplit(".", 1)[-1]
        acc, std = row["test/acc mean"], row["test/acc std"]
        flops = row["model/flops_ratio mean"]
        print(f"{name:20s} n={row['runs']}  test acc {acc:6.2f} +- {std:5.2f}  FLOPs ratio {flops:.3f}")

    pfs = [r for r in runs if r.path.name.startswith("pfs-")]
    l1 = [r for r in runs if r.path.name.startswith("l1_filter-")]
    if pfs:
        print(report.plot_channels(pfs, out=args.root, label=["method._target_", "seed"]))
    if pfs and l1:
        similarity = report.plot_similarity(pfs + l1, out=args.root, label=["method._target_", "seed"])
        print(similarity)
        matrix = json.loads((args.root / "similarity.json").read_text())
        for label, row in zip(matrix["labels"], matrix["correlation"]):
            print(f"{label:45s}", " ".join(f"{v:5.2f}" for v in row))
        costs = [report.search_cost(p, d, dense_stage="pretrain") for p, d in zip(pfs, l1)]
        (args.root / "search_cost.json").write_text(json.dumps(costs, indent=1) + "\n")
        for cost in costs:
            print(
                f"search {cost['search_epoch_s']:.1f} s/epoch vs dense {cost['dense_epoch_s']:.1f} s/epoch "
                f"(ratio {cost['search_epoch_over_dense_epoch']:.2f}); whole search = "
                f"{cost['search_in_dense_epochs']:.2f} dense epochs"
            )


if __name__ == "__main__":
    main()
