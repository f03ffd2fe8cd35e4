"""Greedy local/global imitation against L1-norm filter pruning at the same FLOPs (pretrained ResNet-20).

On the shared pretrained CIFAR ResNet-20 and the shared CIFAR-10 subset: `method=greedy` prunes every
block's first convolution (the residual stream is kept whole, as greedy does) with `--epsilon`; then
`method=l1_filter` prunes the same groups (`budget.prune_coupled=false`) to the FLOPs ratio greedy
reached. Both are tested right after pruning (no BN re-estimation, no training) and after the same
fine-tuning (`--finetune-epochs`, SGD lr 0.01 constant, batch 128), for every seed in `--seeds` (the
data order); the greedy search's wall time is printed beside a fine-tuning epoch's.

    python experiments/greedy/greedy_vs_l1.py --epsilon 0.05 --seeds 0 1

Every run keeps its directory under `--out`, so a killed script resumes. Needs ../shared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import prunelab
from prunelab.report import mean_std

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
WEIGHTS = ("weights", "cifar10", "resnet20-12fca82f.th")


def run(args: argparse.Namespace, name: str, seed: int, overrides: list[str]) -> dict:
    run_dir = args.out / f"{name}_s{seed}"
    overrides = [
        "dataset=cifar10", f"dataset.root={args.shared / 'data' / 'cifar-10-subset'}",
        "dataset.val_size=500", "dataset.num_workers=0", "dataset.batch_size=128", "backbone=resnet20",
        f"backbone.pretrained={args.shared.joinpath(*WEIGHTS)}", "budget.prune_coupled=false", "retrain=finetune",
        f"retrain.epochs={args.finetune_epochs}", "optimizer.lr=0.01", "scheduler=constant", "test_pruned=true",
        "latency.batch_sizes=[]", "trainer.enable_progress_bar=false", "quiet=true", *overrides, f"seed={seed}",
    ]  # fmt: skip
    print("prunelab", *overrides, f"hydra.run.dir={run_dir}", flush=True)
    return prunelab.run(overrides, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--mode", default="both", choices=["local", "global", "both"])
    parser.add_argument(
        "--taylor-after", type=int, default=25, help="the paper's Taylor speed-up after k steps (-1: off)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "greedy_vs_l1")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    if not args.shared.joinpath(*WEIGHTS).exists():
        sys.exit(f"{args.shared} does not hold {'/'.join(WEIGHTS)}: this script needs ../shared")
    results: dict[str, list[dict]] = {"greedy": [], "l1_filter": []}
    for seed in args.seeds:
        taylor = f"method.taylor_after={args.taylor_after if args.taylor_after >= 0 else 'null'}"
        greedy = run(
            args,
            "greedy",
            seed,
            ["method=greedy", f"method.epsilon={args.epsilon}", f"method.mode={args.mode}", taylor],
        )
        results["greedy"].append(greedy)
        ratio = greedy["model/flops_ratio"]
        results["l1_filter"].append(
            run(args, "l1_filter", seed, ["method=l1_filter", f"budget.flops={ratio:.6f}", "budget.tolerance=0.005"])
        )
    print(
        f"\n| method | FLOPs kept | right after pruning (%) | after {args.finetune_epochs} epochs of fine-tuning (%) |"
    )
    print("|---|---|---|---|")
    for name, summaries in results.items():
        print(
            f"| {name} | {mean_std([s['model/flops_ratio'] for s in summaries])} | "
            f"{mean_std([s['pruned/test/acc'] for s in summaries])} | {mean_std([s['test/acc'] for s in summaries])} |"
        )
    dense = mean_std([s["dense/test/acc"] for s in results["greedy"]])
    search = mean_std([s["time/prune_s"] for s in results["greedy"]])
    finetune = mean_std([s["time/finetune_s"] / args.finetune_epochs for s in results["greedy"]])
    print(
        f"dense accuracy {dense}; greedy search {search} s, against {finetune} s per epoch of fine-tuning "
        f"the pruned model on this subset"
    )


if __name__ == "__main__":
    main()
