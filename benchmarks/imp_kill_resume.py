"""IMP as a user runs it, killed with SIGKILL in round 2 and restarted with the same command.

Runs `prunelab experiment=imp_resnet20_cifar10 ...` (3 rounds, 20% per round) to the end once per seed,
and for the first seed a second time in another output folder, killing that process with SIGKILL once
round 2's retraining has written its first checkpoint and then running the same command again. It
prints the sparsity and test accuracy of every round of every run and whether the resumed run ended
with the same masks and metrics as the uninterrupted one.

    python benchmarks/imp_kill_resume.py --epochs 8 --seeds 0 1       # the real CIFAR-10 subset in ../shared
    python benchmarks/imp_kill_resume.py --digits --epochs 6           # offline, scikit-learn's digits
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar-10-subset"


def command(args: argparse.Namespace, seed: int) -> list[str]:
    epochs = args.epochs
    data = (
        ["dataset=digits", "dataset.val_size=0"]
        if args.digits
        else [f"dataset.root={CIFAR}", f"dataset.num_workers={args.workers}"]
    )
    # The preset's lr drops (epochs 56 and 71 of 85) scaled to the shorter rounds.
    milestones = f"[{round(epochs * 56 / 85)},{round(epochs * 71 / 85)}]"
    return [
        sys.executable, "-m", "prunelab.cli", "experiment=imp_resnet20_cifar10", *data,
        f"trainer.max_epochs={epochs}", f"scheduler.milestones={milestones}", f"seed={seed}",
        "trainer.enable_progress_bar=false", "latency.batch_sizes=[1]",
    ]  # fmt: skip


def run_dir(output_root: Path) -> Path:
    (found,) = [p.parent for p in (output_root / "runs").glob("*/config.yaml")]
    return found


def launch(cmd: list[str], output_root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PRUNELAB_OUTPUTS": str(output_root)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def rounds(summary: dict) -> list[tuple[int, float, float]]:
    found = sorted(
        int(k[5:].split("/")[0])
        for k in summary
        if k.startswith("round") and k.endswith("/sparsity") and k.count("/") == 1
    )
    return [(r, summary[f"round{r}/sparsity"], summary.get(f"round{r}/test/acc", float("nan"))) for r in found]


def masks(directory: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((directory / "stages").glob("r*-0-prune/masks.pt"))
    return [torch.load(f, weights_only=True)["masks"] for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--digits", action="store_true", help="use scikit-learn's digits instead of ../shared")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "imp_kill_resume")
    args = parser.parse_args()
    if not args.digits and not CIFAR.exists():
        raise SystemExit(f"{CIFAR} not found: pass --digits, or run beside the shared folder")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    results = {}
    for seed in args.seeds:
        root = args.out / f"uninterrupted-seed{seed}"
        start = time.perf_counter()
        if launch(command(args, seed), root, log).wait() != 0:
            raise SystemExit(f"the uninterrupted run failed; see {log}")
        results[f"seed {seed}"] = json.loads((run_dir(root) / "summary.json").read_text())
        print(f"seed {seed}: finished in {time.perf_counter() - start:.0f} s", flush=True)

    seed = args.seeds[0]
    root = args.out / f"killed-seed{seed}"
    process = launch(command(args, seed), root, log)
    while process.poll() is None:
        checkpoints = list(root.glob("runs/*/stages/r2-1-*/checkpoints/last.ckpt"))
        if checkpoints:
            process.send_signal(signal.SIGKILL)
            process.wait()
            done = sorted(p.parent.name for p in run_dir(root).glob("stages/*/done.json"))
            print(
                f"killed with SIGKILL in round 2 ({checkpoints[0].relative_to(root)} written); done: {', '.join(done)}"
            )
            break
        time.sleep(0.5)
    else:
        raise SystemExit("the run ended before round 2 wrote a checkpoint; nothing was killed")
    if launch(command(args, seed), root, log).wait() != 0:
        raise SystemExit(f"the resumed run failed; see {log}")
    resumed = json.loads((run_dir(root) / "summary.json").read_text())
    results[f"seed {seed} killed + resumed"] = resumed

    print(f"\n{'run':<26} {'round':>5} {'sparsity (%)':>13} {'test acc (%)':>13}")
    for name, summary in results.items():
        for r, s, acc in rounds(summary):
            print(f"{name:<26} {r:>5} {100 * s:>13.4f} {acc:>13.2f}")
    reference = results[f"seed {seed}"]
    same_masks = all(
        all(torch.equal(a[n], b[n]) for n in a)
        for a, b in zip(masks(run_dir(args.out / f"uninterrupted-seed{seed}")), masks(run_dir(root)))
    )
    keys = [k for k in reference if k.startswith(("round", "test/", "model/sparsity")) and not k.startswith("time/")]
    differing = [k for k in keys if reference[k] != resumed.get(k)]
    print(
        f"\nresumed vs uninterrupted (seed {seed}): masks of every round identical: {same_masks}; "
        f"{len(keys) - len(differing)}/{len(keys)} round and test metrics identical"
        + (f" (differ: {', '.join(differing)})" if differing else "")
    )


if __name__ == "__main__":
    main()
