"""The seed papers' comparison rows under one short protocol, on the shared real data (issue 34, point 4).

Two grids, every run through `prunelab.run` (the command's path, in this process) and kept under `--out`,
so a killed script resumes where it stopped:

- `unstructured`: the pretrained ResNet-20 at 90% sparsity on the CIFAR-10 subset. SR-popup (the Lottery
  Jackpots paper's method) searches its mask on the frozen weights for `--epochs` epochs; magnitude, LAMP,
  SNIP, GraSP and SynFlow prune once and fine-tune the masked weights for the same epochs; RigL starts from
  the magnitude mask and trains the same epochs while it drops and grows connections. The Jackpot paper's
  ordering (Tables 1-2, from scratch or pretrained, 160+ epochs) is SR-popup > RigL > magnitude-based and
  pruning at initialisation (SNIP, GraSP).
- `structured`: the pretrained ResNet-56 at half the FLOPs, every method fine-tuned for `--epochs` epochs
  (SGD lr 0.01, cosine). The methods that train before they prune (SFP, DepGraph, GReg-1) get one epoch of
  their own training first; GReg-1's penalty grows to its ceiling within that epoch (the paper grows it
  over ~10k iterations), so it is a short-budget variant, as labelled.

    python experiments/baselines/compare.py unstructured --seeds 0 1
    python experiments/baselines/compare.py structured --seeds 0 1

Needs ../shared (the CIFAR-10 subset and the pretrained weights) beside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import prunelab
from prunelab.report import mean_std

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def common(shared: Path, backbone: str, weights: str) -> list[str]:
    return [
        "dataset=cifar10",
        f"dataset.root={shared / 'data' / 'cifar-10-subset'}",
        "dataset.val_size=500",
        "dataset.num_workers=0",
        f"backbone={backbone}",
        f"backbone.pretrained={shared / 'weights' / 'cifar10' / weights}",
        "latency.batch_sizes=[]",
        "trainer.enable_progress_bar=false",
        "test_pruned=true",
    ]


def unstructured(epochs: int) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each run at 90% sparsity: the same number of training epochs for each."""
    finetune = ["retrain=finetune", f"retrain.epochs={epochs}", "retrain.lr=0.01"]
    return [
        ("SR-popup (jackpot)", ["method=jackpot", f"method.epochs={epochs}", "dataset.batch_size=256"]),
        (
            "RigL (from the magnitude mask)",
            [
                "method=rigl",
                "method.init=magnitude",
                f"method.epochs={epochs}",
                "optimizer.lr=0.01",
                "method.update_every=20",
            ],
        ),
        ("LAMP", ["method=lamp", *finetune]),
        ("magnitude", ["method=magnitude", *finetune]),
        ("SNIP", ["method=snip", *finetune]),
        ("GraSP", ["method=grasp", *finetune]),
        ("SynFlow", ["method=synflow", *finetune]),
    ]


def structured(epochs: int) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each run at half the FLOPs, each fine-tuned for `epochs` epochs."""
    return [
        ("L1", ["method=l1_filter"]),
        ("Taylor", ["method=taylor"]),
        ("FPGM", ["method=fpgm"]),
        ("HRank", ["method=hrank"]),
        ("ThiNet", ["method=thinet"]),
        ("SFP (1 soft epoch)", ["method=sfp", "method.epochs=1", "method.lr=0.01"]),
        ("DepGraph (1 sparse epoch)", ["method=depgraph", "method.epochs=1"]),
        (
            "GReg-1 (penalty grown in 1 epoch)",
            ["method=greg1", "method.delta_lambda=0.03", "method.stabilize_steps=10", "method.update_interval=1"],
        ),
    ]


GRIDS = {
    "unstructured": ("resnet20", "resnet20-12fca82f.th", ["budget.sparsity=0.9"], unstructured),
    "structured": (
        "resnet56",
        "resnet56-4bfd9763.th",
        ["budget.flops=0.5", "retrain=finetune", "retrain.lr=0.01", "scheduler=cosine"],
        structured,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--epochs", type=int, default=3, help="training epochs every method gets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "baselines")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--only", nargs="*", default=None, help="labels' first words to run (default: all)")
    args = parser.parse_args()
    backbone, weights, budget, runs = GRIDS[args.grid]
    if not (args.shared / "weights" / "cifar10" / weights).exists():
        sys.exit(f"{args.shared} does not hold weights/cifar10/{weights}: this script needs ../shared")
    extra = [f"retrain.epochs={args.epochs}"] if args.grid == "structured" else []

    rows = []
    for label, overrides in runs(args.epochs):
        if args.only and label.split()[0] not in args.only:
            continue
        for seed in args.seeds:
            run_dir = args.out / args.grid / f"{overrides[0].split('=')[1]}_s{seed}"
            settings = [*common(args.shared, backbone, weights), *budget, *extra, *overrides, f"seed={seed}"]
            print("prunelab", *settings, f"hydra.run.dir={run_dir}", flush=True)
            summary = prunelab.run(settings, run_dir)
            seconds = sum(v for k, v in summary.items() if k.startswith("time/") and k.endswith("_s"))
            rows.append(
                {
                    "method": label,
                    "seed": seed,
                    "test/acc": summary["test/acc"],
                    "pruned/test/acc": summary.get("pruned/test/acc"),
                    "dense/test/acc": summary.get("dense/test/acc"),
                    "model/flops_ratio": summary.get("model/flops_ratio"),
                    "model/params_ratio": summary.get("model/params_ratio"),
                    "model/sparsity": summary.get("model/sparsity"),
                    "time_s": round(seconds, 1),
                }
            )

    lines = [
        f"{backbone} (pretrained), CIFAR-10 subset, {' '.join(budget[:1])}, {args.epochs} training epochs per method, "
        f"seeds {' '.join(map(str, args.seeds))}",
        "",
        "| method | test acc (%) | per seed | after pruning (%) | FLOPs kept | params kept | sparsity | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        accuracies = [r["test/acc"] for r in mine]
        pruned = [r["pruned/test/acc"] for r in mine if r["pruned/test/acc"] is not None]
        first = mine[0]
        lines.append(
            f"| {name} | {mean_std(accuracies)} | {' '.join(f'{a:.2f}' for a in accuracies)} | "
            f"{mean_std(pruned) if pruned else '-'} | {first['model/flops_ratio']:.3f} | "
            f"{first['model/params_ratio']:.3f} | {first['model/sparsity']:.4f} | "
            f"{sum(r['time_s'] for r in mine) / len(mine):.0f} |"
        )
    if rows and rows[0]["dense/test/acc"] is not None:
        lines.append(f"\ndense pretrained model: {rows[0]['dense/test/acc']:.2f}%")
    table = "\n".join(lines)
    print(table)
    out = args.out / args.grid
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
