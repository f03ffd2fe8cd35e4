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
pull; everything else is the preset's. `concave-{l1,log}-fixed` prune 20% of the survivors per round by
mask value (the paper's Fig. 8 ablation: IMP's sparsities, so the rankings compare at equal sparsity).

    python experiments/concave/concave_vs_imp.py --epochs 2 --seeds 0 1
    python experiments/concave/concave_vs_imp.py --epochs 2 --seeds 0 1 --methods concave-l1-fixed concave-log-fixed
    python experiments/concave/concave_vs_imp.py --overhead       # the per-step cost of the masks and the regulariser

`--overhead` times training steps of ResNet-20 at batch 128 on random data, interleaved (A B C B A ...):
plain; with the relaxed masks attached and lambda = 0; with the l1 and the log regulariser; and the
regulariser's own forward and backward pass over all prunable weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import prunelab

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ROOT.parent / "shared" / "data" / "cifar-10-subset"
PAPER_STEPS = 85 * 391  # a ResNet-20 round in the paper: 85 epochs of 50,000 images at batch 128


def runs(args: argparse.Namespace) -> dict[str, list[str]]:
    steps = args.epochs * -(-5170 // 128)
    scale = args.lam_scale if args.lam_scale is not None else PAPER_STEPS / steps
    found = {
        "imp": ["experiment=imp_resnet20_cifar10"],
        "concave-l1": ["experiment=concave_resnet20_cifar10_l1", f"method.lam={3e-6 * scale:.3g}"],
        "concave-log": ["experiment=concave_resnet20_cifar10_log", f"method.lam={1e-6 * scale:.3g}"],
        "cs": ["experiment=cs_resnet20_cifar10", f"method.lam={1e-8 * scale:.3g}"],
    }
    for name in ("concave-l1", "concave-log"):
        found[f"{name}-fixed"] = [*found[name], "method.selection=fixed_fraction"]
    unknown = set(args.methods) - set(found)
    if unknown:
        raise SystemExit(f"unknown --methods {', '.join(sorted(unknown))}; choose from {', '.join(found)}")
    return {name: found[name] for name in args.methods}


def overhead(repeats: int) -> None:
    import statistics

    import torch
    import torch.nn.functional as F

    from prunelab.backbones import create
    from prunelab.methods.base import MethodContext, Stage
    from prunelab.methods.concave import Concave

    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    ctx = MethodContext(budget={}, data=None, input_shape=(3, 32, 32), num_classes=10, seed=0, run_dir=ROOT)
    setups = {}
    for name, method in (
        ("plain", None),
        ("masks, lambda 0", Concave(lam=0.0)),
        ("masks + l1", Concave(regularizer="l1")),
        ("masks + log", Concave(regularizer="log")),
    ):
        model = create("resnet20", num_classes=10, shortcut="B")
        if method is not None:
            method.setup(model, Stage("search", "fit", round=1), ctx)
            params = method.parameters_to_train(model)
        else:
            params = model.parameters()
        setups[name] = (model, method, torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4))

    def step(name: str) -> float:
        model, method, optimizer = setups[name]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss(model) if method is not None else None
        (loss + extra if extra is not None else loss).backward()
        optimizer.step()
        if method is not None:
            method.after_optimizer_step(model, 0)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in setups}
    order = list(setups)
    for name in order:  # warm-up
        step(name)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(step(name))
    _, method, _ = setups["masks + log"]
    reg = []
    for _ in range(repeats):
        start = time.perf_counter()
        method.extra_loss(None).backward()
        reg.append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    print(f"ResNet-20, batch 128, CPU ({torch.get_num_threads()} threads), median of {repeats} interleaved steps:")
    for name, values in times.items():
        print(
            f"  {name:<18} {1000 * statistics.median(values):8.1f} ms   x{statistics.median(values) / plain:.3f} of "
            "plain"
        )
    masked = statistics.median(times["masks, lambda 0"])
    for name in ("masks + l1", "masks + log"):
        print(
            f"  regulariser's share of a masked step ({name}): "
            f"{100 * (statistics.median(times[name]) / masked - 1):+.1f}%"
        )
    print(
        "  log regulariser alone (forward + backward over "
        f"{sum(layer.values.numel() for layer in method._layers.values()):,} masks): "
        f"{1000 * statistics.median(reg):.2f} ms = {100 * statistics.median(reg) / masked:.1f}% of a masked step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per round (search and ticket training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--lam-scale", type=float, default=None, help="multiply the presets' lambda (default: paper steps / ours)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["imp", "concave-l1", "concave-log", "cs"],
        help="any of imp, concave-l1, concave-log, cs, concave-l1-fixed, concave-log-fixed",
    )
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "concave_vs_imp")
    parser.add_argument("--overhead", action="store_true", help="only time the masks' and the regulariser's cost")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant with --overhead")
    args = parser.parse_args()
    if args.overhead:
        overhead(args.repeats)
        return
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} not found: run beside the shared folder")
    milestones = f"[{round(args.epochs * 56 / 85)},{round(args.epochs * 71 / 85)}]"
    common = [
        f"dataset.root={CIFAR}",
        f"dataset.num_workers={args.workers}",
        f"trainer.max_epochs={args.epochs}",
        f"scheduler.milestones={milestones}",
        "trainer.enable_progress_bar=false",
        "latency.batch_sizes=[]",
        "test_pruned=true",
        "quiet=true",
    ]
    for name, overrides in runs(args).items():
        for seed in args.seeds:
            start = time.perf_counter()
            prunelab.run([*overrides, *common, f"seed={seed}"], args.out / "runs" / f"{name}-s{seed}")
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
            values = [
                run.summary[f"round{r}/pruned/test/acc"] for run in group if f"round{r}/pruned/test/acc" in run.summary
            ]
            cells.append(f"round {r}: {mean_std(values)}" if values else f"round {r}: -")
        print(f"  {' '.join(key)}: {'; '.join(cells)}")
    times = {run.path.name: {k: v for k, v in run.summary.items() if k.startswith("time/")} for run in found}
    (args.out / "times.json").write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
