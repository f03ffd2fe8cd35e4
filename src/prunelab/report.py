"""Analyses of finished runs, read from their directories alone: pruned structures, their similarity,
result tables and search cost.

A run directory holds `config.yaml`, `summary.json` and `stages/<i>-<name>/plan.json` for each
structured prune stage (see pipeline/runners.py). The functions here take run directories (or folders that
contain them, e.g. a multirun sweep), read them with `prunelab.runs`, and write CSV/JSON files and PNG plots
next to them:

    python -m prunelab.report channels RUN_OR_SWEEP... [--out DIR] [--label seed,method.init_from]
    python -m prunelab.report similarity RUN_OR_SWEEP... [--out DIR] [--label ...]
    python -m prunelab.report table RUN_OR_SWEEP... [--out DIR] [--by method._target_]
    python -m prunelab.report rounds RUN_OR_SWEEP... [--out DIR] [--by method]
    python -m prunelab.report cost SEARCH_RUN DENSE_RUN [--search-stage search] [--dense-stage train]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from prunelab.io import atomic_write, write_json, write_text
from prunelab.runs import (
    Run,
    channel_structure,
    find_runs,
    keep_ratios,
    mean_std,  # noqa: F401 (experiments import it from here)
    metrics_so_far,
)


def correlation_matrix(vectors: Sequence[Sequence[float]]) -> list[list[float]]:
    """Pearson correlation coefficients between equal-length vectors (NaN where one is constant)."""
    import numpy as np

    data = np.asarray(vectors, dtype=float)
    centred = data - data.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    return matrix.tolist()


def _default_out(runs: Sequence[Run]) -> Path:
    """The runs' common parent folder (the run itself when there is one)."""
    if len(runs) == 1:
        return runs[0].path
    return Path(os.path.commonpath([str(r.path.resolve()) for r in runs]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_channels(runs: Sequence[Run], out: Path | None = None, label: Sequence[str] = ("seed",)) -> Path:
    """Kept channels per layer of each run's pruned structure on one figure (Pruning from Scratch, Fig. 3).

    Writes `channels.png` and `channels.csv` (one row per run and group) into `out`.
    """
    out = Path(out) if out is not None else _default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    rows = []
    sizes: list[int] = []
    for run in runs:
        names, kept, sizes = channel_structure(run)
        ax.plot(range(1, len(kept) + 1), kept, marker="o", markersize=3, label=run.label(label))
        rows += [[str(run.path), run.label(label), n, k, s] for n, k, s in zip(names, kept, sizes)]
    ax.plot(range(1, len(sizes) + 1), sizes, "k--", linewidth=1, label="before pruning")
    ax.set_xlabel("prunable layer (channel group, module order)")
    ax.set_ylabel("channels kept")
    ax.legend(fontsize=7)
    png = out / "channels.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    _write_csv(out / "channels.csv", ["run", "label", "group", "kept", "size"], rows)
    return png


def plot_similarity(runs: Sequence[Run], out: Path | None = None, label: Sequence[str] = ("seed",)) -> Path:
    """Correlation between the runs' per-layer keep-ratio vectors (Pruning from Scratch, Fig. 2).

    Writes `similarity.png` (heat map), `similarity.json` (labels, vectors, matrix) and
    `similarity.csv` into `out`. All runs must prune the same groups (the same backbone).
    """
    out = Path(out) if out is not None else _default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [keep_ratios(run) for run in runs]
    groups = list(ratios[0])
    if any(list(r) != groups for r in ratios):
        raise ValueError("structure similarity needs runs that prune the same channel groups (one backbone)")
    labels = [run.label(label) for run in runs]
    vectors = [[r[g] for g in groups] for r in ratios]
    matrix = correlation_matrix(vectors)
    write_text(
        out / "similarity.json",
        json.dumps(
            {"runs": [str(r.path) for r in runs], "labels": labels, "groups": groups, "keep_ratios": vectors,
             "correlation": matrix},
            indent=1,
        )
        + "\n"
    )  # fmt: skip
    _write_csv(out / "similarity.csv", ["", *labels], [[lab, *row] for lab, row in zip(labels, matrix)])
    plt = _pyplot()
    size = 2.5 + 0.45 * len(runs)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if len(runs) <= 12 and not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046)
    png = out / "similarity.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


def table(
    runs: Sequence[Run],
    by: Sequence[str] = ("method._target_",),
    metrics: Sequence[str] = ("test/acc", "model/flops_ratio", "model/params_ratio"),
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Mean and standard deviation of summary metrics over the runs that share the `by` config values.

    A metric timed in interleaved rounds (a latency or speedup with `_min` / `_max` in the summaries) also gets
    the lowest and highest round of all the runs (`<metric> min`, `<metric> max`). Writes `table.csv` and
    `table.md` (mean +- std per metric) into `out` when given. Runs without a summary (unfinished) are left out.
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.summary:
            groups.setdefault(tuple(str(run.get(k)) for k in by), []).append(run)
    ranged = {m for m in metrics for members in groups.values() for r in members if f"{m}_min" in r.summary}
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["runs"] = len(members)
        for metric in metrics:
            values = [float(r.summary[metric]) for r in members if metric in r.summary]
            row[f"{metric} mean"] = statistics.fmean(values) if values else float("nan")
            row[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if metric in ranged:
                row[f"{metric} min"] = min(
                    (float(r.summary[f"{metric}_min"]) for r in members if f"{metric}_min" in r.summary),
                    default=math.nan,
                )
                row[f"{metric} max"] = max(
                    (float(r.summary[f"{metric}_max"]) for r in members if f"{metric}_max" in r.summary),
                    default=math.nan,
                )
        rows.append(row)
    if out is not None and rows:
        Path(out).mkdir(parents=True, exist_ok=True)
        _write_csv(Path(out) / "table.csv", list(rows[0]), [list(r.values()) for r in rows])
        write_text(Path(out) / "table.md", markdown_table(rows, by, metrics))
    return rows


def markdown_table(rows: list[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> str:
    """The rows of `table` as a Markdown table with one `mean +- std` cell per metric, followed by the range of the
    rounds where the metric has one; a speedup whose rounds straddle 1.0 reads "within noise"."""
    header = [*by, "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[k]) for k in by] + [str(row["runs"])]
        for m in metrics:
            cell = f"{row[f'{m} mean']:.4g} +- {row[f'{m} std']:.2g}"
            low, high = row.get(f"{m} min", math.nan), row.get(f"{m} max", math.nan)
            if not (math.isnan(low) or math.isnan(high)):
                noise = ", within noise" if "speedup" in m and low <= 1.0 <= high else ""
                cell += f" (rounds {low:.3g}-{high:.3g}{noise})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_epochs(run: Run, stage: str) -> int | None:
    """The epochs a fit stage of the run trained, from its summary or resolved config (None: the
    stage trains no epochs, like a one-shot `prune`)."""
    if run.summary.get(f"{stage}/epochs") is not None:
        return int(run.summary[f"{stage}/epochs"])
    if stage == "prune":
        return None
    if stage == "pretrain":
        return int(run.get("pretrain.epochs"))
    for stage_cfg in ("method.epochs", f"method.{stage}_epochs"):
        if stage != "train" and run.get(stage_cfg) is not None:
            return int(run.get(stage_cfg))
    return int(run.get("trainer.max_epochs"))


def search_cost(search_run: Run, dense_run: Run, search_stage: str = "search", dense_stage: str = "train") -> dict:
    """Wall time of a structure search against epochs of dense training of the same backbone.

    Uses the stages' `time/<stage>_s` (setup and validation included) and their epochs: a fit
    stage's `<stage>/epochs` in the summary, else `pretrain.epochs` for "pretrain", the method's
    `epochs` for a method stage, or `trainer.max_epochs`; a `prune` stage (greedy imitation's search,
    for one) has no epochs, and only its total is compared. Both runs should have run on the same machine.
    """
    search_s = float(search_run.summary[f"time/{search_stage}_s"])
    dense_s = float(dense_run.summary[f"time/{dense_stage}_s"])
    search_epochs, dense_epochs = stage_epochs(search_run, search_stage), stage_epochs(dense_run, dense_stage)
    per_dense = dense_s / dense_epochs
    per_search = search_s / search_epochs if search_epochs else None
    return {
        "search_run": str(search_run.path),
        "dense_run": str(dense_run.path),
        "search_s": search_s,
        "search_epochs": search_epochs,
        "dense_s": dense_s,
        "dense_epochs": dense_epochs,
        "search_epoch_s": per_search,
        "dense_epoch_s": per_dense,
        "search_epoch_over_dense_epoch": per_search / per_dense if per_search is not None else None,
        "search_in_dense_epochs": search_s / per_dense,
    }


def round_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each round of an iterative run ended: `round`, `sparsity`, `flops_ratio`, `test/acc` (None if untested)."""
    rounds = sorted(
        int(k[5:].split("/")[0])
        for k in summary
        if k.startswith("round") and k.endswith("/sparsity") and k[5:].split("/")[0].isdigit() and k.count("/") == 1
    )
    return [
        {
            "round": r,
            "sparsity": summary[f"round{r}/sparsity"],
            "flops_ratio": summary.get(f"round{r}/flops_ratio"),
            "test/acc": summary.get(f"round{r}/test/acc"),
        }
        for r in rounds
    ]


def rounds_table(runs: Sequence[Run], by: Sequence[str] = ("method",), out: Path | None = None) -> list[dict[str, Any]]:
    """Sparsity and test accuracy after every round of iterative runs, mean and std over the runs of a group.

    Runs are grouped by the `by` config values (seeds fall together); unfinished runs count with the
    rounds they completed. Writes `rounds.csv`, `rounds.md` and `rounds.png` (accuracy against sparsity,
    one line per group, error bars of one std) into `out` when given.
    """
    groups: dict[tuple, list[list[dict[str, Any]]]] = {}
    for run in runs:
        rows = round_rows(metrics_so_far(run))
        if rows:
            groups.setdefault(tuple(str(run.get(k)) for k in by), []).append(rows)
    table_rows = []
    for key, members in groups.items():
        for r in sorted({row["round"] for rows in members for row in rows}):
            at = [row for rows in members for row in rows if row["round"] == r]
            sparsities = [float(row["sparsity"]) for row in at]
            accs = [float(row["test/acc"]) for row in at if row["test/acc"] is not None]
            table_rows.append(
                {
                    **dict(zip(by, key)),
                    "round": r,
                    "runs": len(accs),
                    "sparsity mean": statistics.fmean(sparsities),
                    "test/acc mean": statistics.fmean(accs) if accs else float("nan"),
                    "test/acc std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                }
            )
    if out is not None and table_rows:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "rounds.csv", list(table_rows[0]), [list(r.values()) for r in table_rows])
        write_text(out / "rounds.md", rounds_markdown(table_rows, by))
        _plot_rounds(table_rows, by, out / "rounds.png")
    return table_rows


def rounds_markdown(rows: list[dict[str, Any]], by: Sequence[str]) -> str:
    """The rows of `rounds_table` as Markdown: sparsity (%) and test accuracy mean +- std per round."""
    lines = ["| " + " | ".join([*by, "round", "runs", "sparsity (%)", "test/acc"]) + " |", "|" + "---|" * (len(by) + 4)]
    for row in rows:
        cells = [str(row[k]) for k in by] + [str(row["round"]), str(row["runs"]), f"{100 * row['sparsity mean']:.2f}"]
        cells.append(f"{row['test/acc mean']:.2f} +- {row['test/acc std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_rounds(rows: list[dict[str, Any]], by: Sequence[str], png: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys(tuple(row[k] for k in by) for row in rows):
        mine = [row for row in rows if tuple(row[k] for k in by) == key]
        ax.errorbar(
            [100 * row["sparsity mean"] for row in mine],
            [row["test/acc mean"] for row in mine],
            yerr=[row["test/acc std"] for row in mine],
            marker="o",
            capsize=3,
            label=" ".join(f"{k}={v}" for k, v in zip(by, key)),
        )
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


PARETO_AXES = {"flops": "model/flops_ratio", "params": "model/params_ratio", "sparsity": "model/sparsity"}


def pareto(
    runs: Sequence[Run],
    x: str = "flops",
    by: Sequence[str] = ("method",),
    metric: str = "test/acc",
    out: Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Accuracy against FLOPs (or parameters, or sparsity) kept, one line per `by` group, over seeds.

    Runs are grouped by the `by` values and their `budget.<x>` setting (seeds fall together); each point
    is the mean and std of the measured ratio (`model/<x>_ratio`, or `model/sparsity`) and of `metric`.
    The papers' reported points come from the runs' `paper` config (the presets set it: `paper.acc`,
    `paper.<x>`, `paper.source`). Writes `pareto.csv`, `pareto.md` and `pareto.png` into `out` when given.
    Returns (points, paper points).
    """
    if x not in PARETO_AXES:
        raise ValueError(f"pareto: x must be one of {', '.join(PARETO_AXES)}; got {x!r}")
    axis = PARETO_AXES[x]
    groups: dict[tuple, list[Run]] = {}
    papers: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        if not run.summary or metric not in run.summary or axis not in run.summary:
            continue
        key = tuple(str(run.get(k)) for k in by)
        groups.setdefault((*key, str(run.get(f"budget.{x}"))), []).append(run)
        paper = run.get("paper")
        if OmegaConf.is_dict(paper) and paper.get("acc") is not None and paper.get(x) is not None:
            point = (*key, float(paper[x]))  # a name: mypy reads `papers[(*key, ...)]` as Python 3.11's syntax
            papers[point] = {
                **dict(zip(by, key)),
                x: float(paper[x]),
                "acc": float(paper.acc),
                "source": str(paper.get("source", "")),
            }
    points = []
    for key, members in groups.items():
        xs = [float(r.summary[axis]) for r in members]
        ys = [float(r.summary[metric]) for r in members]
        points.append(
            {
                **dict(zip(by, key[:-1])),
                f"budget.{x}": key[-1],
                "runs": len(members),
                f"{x} mean": statistics.fmean(xs),
                f"{x} std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                f"{metric} mean": statistics.fmean(ys),
                f"{metric} std": statistics.stdev(ys) if len(ys) > 1 else 0.0,
            }
        )
    points.sort(key=lambda p: (tuple(p[k] for k in by), p[f"{x} mean"]))
    paper_points = list(papers.values())
    if out is not None and points:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "pareto.csv", list(points[0]), [list(p.values()) for p in points])
        write_text(out / "pareto.md", pareto_markdown(points, paper_points, x, by, metric))
        _plot_pareto(points, paper_points, x, by, metric, out / "pareto.png")
    return points, paper_points


def pareto_markdown(
    points: list[dict[str, Any]], papers: list[dict[str, Any]], x: str, by: Sequence[str], metric: str
) -> str:
    """The points of `pareto` as Markdown (ratios in %), then the papers' points."""
    lines = [
        "| "
        + " | ".join([*by, f"budget.{x}", "runs", f"{x} kept (%)" if x != "sparsity" else "sparsity (%)", metric])
        + " |",
        "|" + "---|" * (len(by) + 4),
    ]
    for p in points:
        cells = [str(p[k]) for k in by] + [
            p[f"budget.{x}"],
            str(p["runs"]),
            f"{100 * p[f'{x} mean']:.2f} +- {100 * p[f'{x} std']:.2f}",
            f"{p[f'{metric} mean']:.2f} +- {p[f'{metric} std']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if papers:
        lines += [
            "",
            "| " + " | ".join([*by, f"paper {x} (%)", "paper accuracy", "source"]) + " |",
            "|" + "---|" * (len(by) + 3),
        ]
        lines += [
            "| " + " | ".join([*(str(p[k]) for k in by), f"{100 * p[x]:.2f}", f"{p['acc']:.2f}", p["source"]]) + " |"
            for p in papers
        ]
    return "\n".join(lines) + "\n"


def _plot_pareto(
    points: list[dict[str, Any]], papers: list[dict[str, Any]], x: str, by: Sequence[str], metric: str, png: Path
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours: dict[tuple, Any] = {}
    for key in dict.fromkeys(tuple(p[k] for k in by) for p in points):
        mine = [p for p in points if tuple(p[k] for k in by) == key]
        line = ax.errorbar(
            [100 * p[f"{x} mean"] for p in mine],
            [p[f"{metric} mean"] for p in mine],
            xerr=[100 * p[f"{x} std"] for p in mine],
            yerr=[p[f"{metric} std"] for p in mine],
            marker="o",
            capsize=3,
            label=" ".join(str(v) for v in key),
        )
        colours[key] = line[0].get_color()
    for paper in papers:
        key = tuple(paper[k] for k in by)
        ax.scatter(
            [100 * paper[x]],
            [paper["acc"]],
            marker="*",
            s=120,
            color=colours.get(key, "black"),
            zorder=3,
            label=f"{' '.join(key)}: paper ({paper['source']})" if paper["source"] else f"{' '.join(key)}: paper",
        )
    ax.set_xlabel(
        {"flops": "FLOPs kept (%)", "params": "parameters kept (%)", "sparsity": "sparsity (% of weights removed)"}[x]
    )
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def trials_table(sweep_dir: Path, objective: str = "val/acc", out: Path | None = None) -> list[dict[str, Any]]:
    """Every finished trial of a sweep: its overrides, objective, test accuracy and FLOPs ratio, best first.

    Writes `trials.csv`, `trials.md` and the best trial's resolved config as `best_config.yaml` into
    `out` (default: the sweep directory).
    """
    rows = []
    for run in find_runs([sweep_dir]):
        if objective not in run.summary:
            continue
        overrides_file = run.path / ".hydra" / "overrides.yaml"
        overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.exists() else ""
        rows.append(
            {
                "run": str(run.path.relative_to(sweep_dir)),
                "overrides": overrides,
                objective: float(run.summary[objective]),
                "test/acc": run.summary.get("test/acc"),
                "model/flops_ratio": run.summary.get("model/flops_ratio"),
            }
        )
    rows.sort(key=lambda r: -r[objective])
    # What the trials share (the preset, fixed overrides) is said once, not in every row.
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(t for t in row["overrides"].split() if t not in common)
    out = Path(out) if out is not None else Path(sweep_dir)
    if rows:
        _write_csv(out / "trials.csv", list(rows[0]), [list(r.values()) for r in rows])
        fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
        lines = ["| trial overrides | " + objective + " | test/acc | FLOPs ratio |", "|---|---|---|---|"]
        lines += [
            f"| {r['overrides']} | {r[objective]:.2f} | {fmt(r['test/acc'], '.2f')} | "
            f"{fmt(r['model/flops_ratio'], '.3f')} |"
            for r in rows
        ]
        write_text(out / "trials.md", "\n".join(lines) + "\n")
        write_text(out / "best_config.yaml", (Path(sweep_dir) / rows[0]["run"] / "config.yaml").read_text())
    return rows


class SweepTrials(Callback):
    """A Hydra callback (`hydra.callbacks`) writing `trials_table` into the sweep directory when a sweep ends."""

    def __init__(self, objective: str = "val/acc") -> None:
        self.objective = objective

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        rows = trials_table(Path(config.hydra.sweep.dir), self.objective)
        if rows:
            print(
                f"sweep: {len(rows)} trials; best {self.objective} {rows[0][self.objective]:.2f} with "
                f"{rows[0]['overrides']} (trials.md, best_config.yaml in {config.hydra.sweep.dir})"
            )


def main(argv: Sequence[str] | None = None) -> None:
    """The `python -m prunelab.report` command."""
    parser = argparse.ArgumentParser(prog="python -m prunelab.report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("channels", "similarity", "table", "rounds", "pareto"):
        sub = commands.add_parser(name)
        sub.add_argument("runs", nargs="+", help="run directories or folders holding them")
        sub.add_argument("--out", type=Path, default=None, help="where to write (default: the runs' common folder)")
        if name in ("rounds", "pareto"):
            sub.add_argument("--by", default="method", help="comma-separated config keys to group by (not seed)")
        if name == "pareto":
            sub.add_argument("--x", default="flops", choices=list(PARETO_AXES), help="what the x axis counts")
            sub.add_argument("--metric", default="test/acc", help="the summary key on the y axis")
        elif name == "table":
            sub.add_argument("--by", default="method._target_", help="comma-separated config keys to group by")
            sub.add_argument(
                "--metrics",
                default="test/acc,model/flops_ratio,model/params_ratio",
                help="comma-separated summary keys to average",
            )
        else:
            sub.add_argument("--label", default="seed", help="comma-separated config keys naming each run")
    cost = commands.add_parser("cost")
    cost.add_argument("search_run", type=Path)
    cost.add_argument("dense_run", type=Path)
    cost.add_argument("--search-stage", default="search")
    cost.add_argument("--dense-stage", default="train")
    args = parser.parse_args(argv)

    if args.command == "cost":
        (search,), (dense,) = find_runs([args.search_run]), find_runs([args.dense_run])
        result = search_cost(search, dense, args.search_stage, args.dense_stage)
        write_json(search.path / "search_cost.json", result, indent=1)
        print(json.dumps(result, indent=1))
        return
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"no run directories under {', '.join(args.runs)}")
    if args.command == "rounds":
        by = args.by.split(",")
        rows = rounds_table(runs, by=by, out=args.out or _default_out(runs))
        if not rows:
            raise SystemExit("none of these runs has rounds (round<r>/sparsity in its summary or stages)")
        print(rounds_markdown(rows, by), end="")
        return
    if args.command == "pareto":
        by = args.by.split(",")
        points, papers = pareto(runs, x=args.x, by=by, metric=args.metric, out=args.out or _default_out(runs))
        if not points:
            raise SystemExit(
                f"none of these runs has finished with {args.metric} and {PARETO_AXES[args.x]} in its summary"
            )
        print(pareto_markdown(points, papers, args.x, by, args.metric), end="")
        return
    if args.command == "table":
        by, metrics = args.by.split(","), args.metrics.split(",")
        rows = table(runs, by=by, metrics=metrics, out=args.out or _default_out(runs))
        print(markdown_table(rows, by, metrics), end="")
        return
    plot = plot_channels if args.command == "channels" else plot_similarity
    print(plot(runs, out=args.out, label=args.label.split(",")))


if __name__ == "__main__":
    main()
