"""Pruned structures of Pruning from Scratch over seeds and initialisations (the paper's Figures 2 and 3).

For every seed, the gate search runs from the random initialisation and from checkpoints of the
expanded backbone after `--epochs` epochs of dense training (`method.init_from`); the structures are
compared by the correlation of their per-layer keep ratios, and the kept channels of the random
initialisations are plotted per layer. Runs go to `<root>/dense-e<k>-s<seed>` (dense training of the
x`expansion` backbone) and `<root>/pfs-<init>-s<seed>` (search and prune only: `retrain=none`);
`prunelab.report` writes `channels.png` and `similarity.png` (with CSV/JSON beside them) into `<root>`.

Example (the paper's VGG-16 setting, on a GPU):
    python experiments/pfs/pfs_structures.py --seeds 0 1 2 3 4 --epochs 10 20 40 80 160 \
        --common dataset=cifar10 backbone=vgg16 --search experiment=pfs_vgg16_cifar10
Overrides in --common go to every run, --search only to the searches, --dense only to dense training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import prunelab
from prunelab import report


def _prunelab(run_dir: Path, overrides: list[str]) -> None:
    """Run one experiment unless it already finished (a killed one resumes)."""
    if (run_dir / "summary.json").exists():
        return
    print("+", *overrides, f"hydra.run.dir={run_dir}", flush=True)
    prunelab.run(overrides, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="*", default=[1, 5], help="dense epochs of the init checkpoints")
    parser.add_argument("--root", type=Path, default=Path("outputs/pfs_structures"))
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--search", nargs="*", default=[], help="overrides for the PFS searches")
    parser.add_argument("--dense", nargs="*", default=[], help="overrides for the dense training runs")
    args = parser.parse_args()
    quiet = ["trainer.enable_progress_bar=false", "latency.batch_sizes=[]"]
    search = ["method=pfs", *args.common, *args.search, "retrain=none", "test=false", *quiet]

    # The init checkpoints must be of the expanded backbone the search starts from.
    width = _search_width(search)
    for seed in args.seeds:
        inits = {"random": None}
        for epochs in args.epochs:
            dense_dir = args.root / f"dense-e{epochs}-s{seed}"
            _prunelab(
                dense_dir,
                ["method=dense", *args.common, *args.dense, f"backbone.width={width:g}", f"trainer.max_epochs={epochs}",
                 f"seed={seed}", *quiet],
            )  # fmt: skip
            inits[f"e{epochs}"] = str((dense_dir / "model.pt").resolve())
        for name, checkpoint in inits.items():
            extra = [f"method.init_from={checkpoint}"] if checkpoint else []
            _prunelab(args.root / f"pfs-{name}-s{seed}", [*search, *extra, f"seed={seed}"])

    runs = [r for r in report.find_runs([args.root]) if r.path.name.startswith("pfs-")]
    random_runs = [r for r in runs if r.path.name.startswith("pfs-random-")]
    print(report.plot_channels(random_runs, out=args.root, label=["seed"]))
    print(report.plot_similarity(runs, out=args.root, label=["seed", "method.init_from"]))


def _search_width(overrides: list[str]) -> float:
    """backbone.width x method.expansion of the search runs, from their composed config."""
    from hydra import compose, initialize_config_dir

    from prunelab.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "paths.output_dir=unused"])
    return float(cfg.backbone.width) * float(cfg.method.expansion)


if __name__ == "__main__":
    main()
