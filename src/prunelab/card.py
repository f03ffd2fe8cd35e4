"""The report card of one benchmark protocol: every method and control at every budget, over seeds, beside the
protocol's own dense model and the published figures, written as Markdown, CSV and plots (docs/bench.md).

It reads the folder a protocol's runner writes:

    OUT/protocol.yaml               the protocol (dataset, backbone, fine-tuning, budgets, seeds, methods, anchors)
    OUT/cells/<cell>/cell.json      the cell's method, budget, seed, control and `of` (the cell a control copies)
    OUT/cells/<cell>/summary.json   the run's results (absent: the cell is unfinished and reported as missing)

and writes OUT/report/card.md, card.csv, pareto_macs.png and pareto_latency.png:

    python -m prunelab.card OUT [--anchors SETTING] [--anchor-table FILE] [--wandb]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prunelab.io import atomic_write, write_text
from prunelab.report import _pyplot, stage_epochs
from prunelab.runs import Run, mean_std

ANCHOR_TABLE = Path(__file__).with_name("anchors.yaml")
# A published row matches one of ours when their speedups (or kept parameters, or densities) differ by at most 10%:
# 2.00x-2.13x rows are one setting in the papers' tables, 2.55x is another.
ANCHOR_TOLERANCE = 0.10
CONTROLS = {
    "random_channels": "+ random channels",
    "random_mask": "+ random mask",
    "scratch_e": "Scratch-E",
    "scratch_b": "Scratch-B",
    "reinit_mask": "+ re-initialised mask",
    "dense_finetune": "dense fine-tuned",
}
RANDOM_CONTROLS = ("random_channels", "random_mask")
CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10, "tiny_imagenet": 200, "imagenet": 1000}


@dataclass
class Cell:
    """One cell of the grid: what cell.json says it is, and its run (summary empty when unfinished)."""

    id: str
    method: str
    budget: str | None
    seed: int
    control: str | None
    of: str | None
    run: Run

    @property
    def done(self) -> bool:
        return bool(self.run.summary)


def load_cells(out: Path) -> list[Cell]:
    """Every cell under OUT/cells, finished or not, in folder order."""
    cells = []
    for info_file in sorted(Path(out).glob("cells/*/cell.json")):
        info, path = json.loads(info_file.read_text()), info_file.parent
        summary_file, config_file = path / "summary.json", path / "config.yaml"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        config = OmegaConf.load(config_file) if config_file.exists() else None
        cells.append(
            Cell(
                id=str(info.get("cell", path.name)),
                method=str(info.get("method")),
                budget=None if info.get("budget") is None else str(info["budget"]),
                seed=int(info.get("seed", 0)),
                control=info.get("control") or None,
                of=info.get("of") or None,
                run=Run(path=path, config=config, summary=summary),
            )
        )
    return cells


def load_anchors(setting: str | None, table: Path | None = None) -> list[dict[str, Any]]:
    """The published rows of a setting (e.g. `cifar10_resnet56`) in the anchor table; none for a null setting."""
    if not setting:
        return []
    anchors = _load(table or ANCHOR_TABLE)
    if setting not in anchors:
        raise KeyError(f"no anchor setting {setting!r} in {table or ANCHOR_TABLE}; there are: {', '.join(anchors)}")
    return [dict(a) for a in anchors[setting]]


def _fmean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def _label(method: str, control: str | None) -> str:
    if control is None:
        return method
    if control == "dense_finetune":
        return CONTROLS[control]
    return f"{method} {CONTROLS.get(control, control)}"


def _steps_per_epoch(run: Run) -> float | None:
    """Optimizer steps in one epoch, from a stage that trained all its epochs (`<stage>/steps` / `<stage>/epochs`)."""
    s = run.summary
    for key, epochs in s.items():
        tag = key[: -len("/epochs")]
        if key.endswith("/epochs") and epochs and s.get(f"{tag}/end") == "max_epochs" and s.get(f"{tag}/steps"):
            return float(s[f"{tag}/steps"]) / float(epochs)
    return None


def training_steps(run: Run) -> tuple[float, float]:
    """(plain, MACs-weighted) optimizer steps of the run's training stages.

    A step before the run's first prune stage trains the dense model and weighs 1; a step after it trains the
    pruned model and weighs the final MACs ratio (`model/flops_ratio`: < 1 for a structured prune, 1.0 for masks,
    which dense kernels compute in full).
    """
    s = run.summary
    listing = run.path / "stages.json"
    stages = json.loads(listing.read_text()) if listing.exists() else []
    if stages:
        tags = [(e["kind"], e["name"] if e.get("round") is None else f"round{e['round']}/{e['name']}") for e in stages]
    else:
        tags = [("fit", k[: -len("/steps")]) for k in s if k.endswith("/steps")]
    ratio, pruned, plain, weighted = float(s.get("model/flops_ratio", 1.0)), False, 0.0, 0.0
    for kind, tag in tags:
        if kind == "prune":
            pruned = True
        steps = float(s.get(f"{tag}/steps") or 0)
        plain += steps
        weighted += steps * (ratio if pruned else 1.0)
    return plain, weighted


def wall_seconds(run: Run) -> float:
    """The run's wall time: the sum of its stages' `time/<stage>_s` (evaluations and setup included)."""
    return sum(float(v) for k, v in run.summary.items() if k.startswith("time/") and k.endswith("_s"))


def _latency_keys(summary: dict[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for k in summary if (m := re.fullmatch(r"model/latency_b(\d+)_ms", k))})


def _axes(row: dict[str, Any]) -> dict[str, float | None]:
    """Where a row of ours sits on each axis a published figure may give: speedup, parameters kept, density."""
    return {
        "speedup": row.get("theoretical speedup"),
        "params_kept": 1 / row["compression"] if row.get("compression") else None,
        "density": 1 - row["sparsity"] if row.get("sparsity") is not None else None,
    }


def _published(cells: list[Cell], method: str, anchors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The published candidates for a method: its presets' `paper` field and the anchor table's rows for it."""
    found = [dict(a, kind="table") for a in anchors if a["method"] in {method, *(c.run.get("method") for c in cells)}]
    for cell in cells:
        paper: Any = cell.run.get("paper") if cell.run.config is not None else None
        if not OmegaConf.is_dict(paper) or paper.get("acc") is None:
            continue
        entry: dict[str, Any] = {"method": method, "acc": float(paper.acc), "base_acc": None, "kind": "preset"}
        entry["source"] = str(paper.get("source") or "preset")
        if paper.get("flops"):
            entry["speedup"] = 1 / float(paper.flops)
        elif paper.get("params"):
            entry["params_kept"] = float(paper.params)
        elif paper.get("sparsity") is not None:
            entry["density"] = 1 - float(paper.sparsity)
        if entry not in found:
            found.append(entry)
    return found


def match_anchor(row: dict[str, Any], candidates: list[dict[str, Any]], tolerance: float = ANCHOR_TOLERANCE):
    """The published candidate nearest to the row (relative distance on the axis it states), within `tolerance`."""
    ours, best, best_distance = _axes(row), None, tolerance
    for candidate in candidates:
        for axis in ("speedup", "params_kept", "density"):
            value = ours[axis]
            if candidate.get(axis) and value:
                distance = abs(value / float(candidate[axis]) - 1)
                if distance <= best_distance:
                    best, best_distance = candidate, distance
    return best


def _dense_epoch_seconds(run: Run) -> float | None:
    """Seconds of one epoch of the dense fine-tuned control: its longest training stage's time over its epochs."""
    tags = [k[: -len("/steps")] for k in run.summary if k.endswith("/steps") and f"time/{k[:-6]}_s" in run.summary]
    if not tags:
        return None
    tag = max(tags, key=lambda t: float(run.summary[f"time/{t}_s"]))
    epochs = stage_epochs(run, tag) if run.config is not None or f"{tag}/epochs" in run.summary else None
    return float(run.summary[f"time/{tag}_s"]) / epochs if epochs else None


def _load(path: Path) -> Any:
    """A YAML file as plain containers."""
    return OmegaConf.to_container(OmegaConf.load(path))


def _num_classes(cells: list[Cell], protocol: dict[str, Any]) -> int | None:
    for cell in cells:
        if cell.run.config is not None and cell.run.get("dataset.num_classes") is not None:
            return int(cell.run.get("dataset.num_classes"))
    return CLASSES.get(str(protocol.get("dataset")))


def _aggregate(
    key: tuple[str, str | None, str | None],
    members: list[Cell],
    dense_acc: dict[int, float],
    dense_ft: dict[int, float],
    top5: bool,
    steps_per_epoch: float | None,
    dense_epoch_s: float | None,
) -> dict[str, Any]:
    """One row of the card: the finished cells of one (method, control, budget), aggregated over their seeds."""
    method, control, budget = key
    done = [c for c in members if c.done]
    row: dict[str, Any] = {"label": _label(method, control), "method": method, "control": control or ""}
    row.update({"budget": budget or "", "seeds": len(done), "missing": len(members) - len(done)})
    row["seed list"] = " ".join(str(c.seed) for c in done)
    s = [c.run.summary for c in done]

    def stat(name: str, values: list[float]) -> None:
        row[f"{name} mean"], row[f"{name} std"] = _fmean(values), _std(values)

    def mean_of(k: str) -> float | None:
        return _fmean([float(x[k]) for x in s if x.get(k) is not None])

    stat("top1", [float(x["test/acc"]) for x in s if "test/acc" in x])
    row["top1 values"] = [float(x["test/acc"]) for x in s if "test/acc" in x]
    if top5:
        stat("top5", [float(x["test/acc5"]) for x in s if "test/acc5" in x])
    stat("vs dense", [float(c.run.summary["test/acc"]) - dense_acc[c.seed] for c in done if c.seed in dense_acc])
    if control != "dense_finetune":
        stat("vs dense-FT", [float(c.run.summary["test/acc"]) - dense_ft[c.seed] for c in done if c.seed in dense_ft])
    macs, dense_macs, params = mean_of("model/flops"), mean_of("dense/flops"), mean_of("model/params")
    sparsity, dense_params = mean_of("model/sparsity") or 0.0, mean_of("dense/params")
    row.update({"MACs": macs, "FLOPs (2 x MACs)": 2 * macs if macs else None, "dense MACs": dense_macs})
    row["params"] = params
    row["nonzero params"] = params * (1 - sparsity) if params else None
    row["compression"] = dense_params / row["nonzero params"] if dense_params and row["nonzero params"] else None
    row["theoretical speedup"] = dense_macs / macs if dense_macs and macs else None
    row["sparsity"] = sparsity
    for b in sorted({b for x in s for b in _latency_keys(x)}):
        for prefix, form in (("", "eager"), ("deployed_", "deployed")):
            row[f"latency b{b} {form} ms"] = mean_of(f"model/{prefix}latency_b{b}_ms")
            row[f"speedup b{b} {form}"] = mean_of(f"model/{prefix}speedup_b{b}")
    for k in ("device", "threads", "format"):
        values = sorted({str(x[f"latency/{k}"]) for x in s if f"latency/{k}" in x})
        row[f"latency {k}"] = ", ".join(values)
    row["wall s"] = _fmean([wall_seconds(c.run) for c in done])
    # Each run's own steps per epoch where one of its stages trained whole epochs, else the protocol's.
    per_epoch = [(training_steps(c.run), _steps_per_epoch(c.run) or steps_per_epoch) for c in done]
    row["train epochs"] = _fmean([p / n for (p, _), n in per_epoch if n])
    row["dense-epoch eq"] = _fmean([w / n for (_, w), n in per_epoch if n])
    row["wall in dense epochs"] = row["wall s"] / dense_epoch_s if dense_epoch_s and row["wall s"] else None
    return row


def _add_published(row: dict[str, Any], candidates: list[dict[str, Any]]) -> None:
    anchor = match_anchor(row, candidates) if row["control"] == "" else None
    row["published acc"] = anchor["acc"] if anchor else None
    row["published base acc"] = anchor.get("base_acc") if anchor else None
    row["published at"] = _axis_text(anchor) if anchor else ""
    row["published speedup"] = anchor.get("speedup") if anchor else None
    row["published source"] = anchor.get("source", "") if anchor else ""
    ours = row["top1 mean"]
    row["gap"] = ours - anchor["acc"] if anchor and ours is not None else None
    row["our drop"] = row.get("vs dense mean") if anchor else None
    base = row["published base acc"]
    row["published drop"] = anchor["acc"] - base if anchor and base is not None else None


def _axis_text(anchor: dict[str, Any]) -> str:
    if anchor.get("speedup"):
        return f"{float(anchor['speedup']):.2f}x"
    if anchor.get("params_kept"):
        return f"{100 * float(anchor['params_kept']):.1f}% params"
    return f"{100 * (1 - float(anchor['density'])):.1f}% sparse"


def _order(rows: list[dict[str, Any]], budgets: list[str]) -> list[dict[str, Any]]:
    """By budget (the protocol's order), methods by top-1 best first, each followed by its controls; the dense
    fine-tuned control last."""
    rank = {b: i for i, b in enumerate(budgets)}
    control_rank = {c: i for i, c in enumerate(CONTROLS)}
    methods = [r for r in rows if r["control"] == ""]
    methods.sort(key=lambda r: (rank.get(r["budget"], len(rank)), r["budget"], -(r["top1 mean"] or -math.inf)))
    ordered = []
    for m in methods:
        ordered.append(m)
        mine = [r for r in rows if r["control"] not in ("", "dense_finetune") and _same(r, m)]
        ordered += sorted(mine, key=lambda r: control_rank.get(r["control"], len(control_rank)))
    return ordered + [r for r in rows if r not in ordered]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["method"], a["budget"]) == (b["method"], b["budget"])


def _compare_random(rows: list[dict[str, Any]]) -> None:
    """Each method row gets its random control's top-1 difference, and whether it exceeds the two stds together."""
    for m in (r for r in rows if r["control"] == ""):
        for c in rows:
            if c["control"] in RANDOM_CONTROLS and _same(c, m):
                if m["top1 mean"] is not None and c["top1 mean"] is not None:
                    m["vs random control"] = m["top1 mean"] - c["top1 mean"]
                    m["random control stds"] = (m["top1 std"] or 0.0) + (c["top1 std"] or 0.0)
                    # One seed on either side has no spread to judge a difference by: no verdict.
                    spread = min(m["seeds"], c["seeds"]) > 1
                    m["beats random control"] = m["vs random control"] > m["random control stds"] if spread else None


def report_card(
    out: Path,
    anchors: str | None = None,
    anchor_table: Path | None = None,
    wandb: bool | None = None,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """The report card of the protocol folder `out`: one row per (method or control, budget), seeds aggregated.

    `anchors` names the anchor table's setting (default: the protocol's `anchors`); `wandb` logs the rows as a W&B
    table, offline, in OUT/report/wandb (default: when the protocol's logger is wandb). Writes OUT/report/card.md,
    card.csv and, with `plots`, pareto_macs.png and pareto_latency.png. Unfinished cells are counted as missing.
    """
    out = Path(out)
    protocol_file = out / "protocol.yaml"
    protocol: dict[str, Any] = _load(protocol_file) if protocol_file.exists() else {}
    cells = load_cells(out)
    if not cells:
        raise FileNotFoundError(f"no cells (cells/*/cell.json) under {out}")
    finished = [c for c in cells if c.done]
    dense_acc: dict[int, float] = {}
    for c in finished:
        if "dense/test/acc" in c.run.summary:
            dense_acc.setdefault(c.seed, float(c.run.summary["dense/test/acc"]))
    dense_ft_cells = [c for c in finished if c.control == "dense_finetune"]
    dense_ft = {c.seed: float(c.run.summary["test/acc"]) for c in dense_ft_cells if "test/acc" in c.run.summary}
    per_epoch = [p for c in finished if (p := _steps_per_epoch(c.run))]
    steps_per_epoch = statistics.median(per_epoch) if per_epoch else None
    dense_epoch_s = _dense_epoch_seconds(dense_ft_cells[0].run) if dense_ft_cells else None
    by_id = {c.id: c for c in cells}
    groups: dict[tuple[str, str | None, str | None], list[Cell]] = {}
    for c in cells:
        method = by_id[c.of].method if c.of in by_id else c.method
        groups.setdefault((method, c.control, c.budget), []).append(c)
    top5 = (_num_classes(cells, protocol) or 0) > 10
    table = load_anchors(anchors if anchors is not None else protocol.get("anchors"), anchor_table)
    rows = []
    for key, members in groups.items():
        row = _aggregate(key, members, dense_acc, dense_ft, top5, steps_per_epoch, dense_epoch_s)
        _add_published(row, _published([m for m in members if m.done], key[0], table))
        rows.append(row)
    rows = _order(rows, [str(b) for b in (protocol.get("budgets") or {})])
    _compare_random(rows)
    report = out / "report"
    missing = [c for c in cells if not c.done]
    write_text(report / "card.md", card_markdown(rows, protocol, missing, top5))
    _write_rows_csv(report / "card.csv", rows)
    if plots:
        _plot(rows, "MACs", "MACs (millions)", report / "pareto_macs.png")
        _plot(rows, _latency_axis(rows), "measured latency, batch 1 (ms)", report / "pareto_latency.png")
    if wandb if wandb is not None else protocol.get("logger") == "wandb":
        log_wandb(rows, report, str(protocol.get("name", out.name)))
    return rows


def _latency_axis(rows: list[dict[str, Any]]) -> str:
    """Batch-1 latency in the deployed format when the runs measured it, else eager."""
    deployed = "latency b1 deployed ms"
    return deployed if any(r.get(deployed) is not None for r in rows) else "latency b1 eager ms"


def _write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "top1 values"))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _num(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "" if value is None else format(float(value) * scale, spec)


def _pm(row: dict[str, Any], name: str, signed: bool = False) -> str:
    mean, std = row.get(f"{name} mean"), row.get(f"{name} std")
    if mean is None:
        return ""
    return f"{mean:{'+' if signed else ''}.2f}" + (f" +- {std:.2f}" if row["seeds"] > 1 and std is not None else "")


def card_markdown(
    rows: list[dict[str, Any]], protocol: dict[str, Any], missing: list[Cell] | None = None, top5: bool = False
) -> str:
    """The card as Markdown: the protocol, the results, the speed and cost, the published figures, the reading."""
    ft = protocol.get("finetune") or {}
    budgets = protocol.get("budgets") or {}
    lines = [f"# Report card: {protocol.get('name', 'protocol')}", ""]
    if protocol.get("description"):
        lines += [str(protocol["description"]).strip(), ""]
    lines += [
        f"- dataset: {protocol.get('dataset', '?')}; backbone: {protocol.get('backbone', '?')}"
        + (f"; {protocol['kind']} pruning" if protocol.get("kind") else ""),
        f"- fine-tuning shared by every method: {ft.get('epochs', '?')} epochs, lr {ft.get('lr', '?')}",
        f"- seeds: {', '.join(map(str, protocol.get('seeds') or []))}",
        "- budgets: " + "; ".join(f"{k} ({' '.join(map(str, v or []))})" for k, v in budgets.items()),
        f"- published figures: {protocol.get('anchors') or 'none'} (anchor table) and the presets' `paper` field",
        "",
        "Top-1 and top-5 in %, mean +- std over seeds; vs dense: top-1 minus the same seed's dense model before "
        "pruning (vs dense-FT: minus the dense model fine-tuned as long), mean of the per-seed differences. MACs are "
        "multiply-accumulates (what most papers call FLOPs); FLOPs = 2 x MACs.",
        "",
    ]
    header = ["", "budget", "seeds", "top-1", *(["top-5"] if top5 else []), "vs dense", "vs dense-FT", "MACs (M)"]
    header += ["FLOPs (M)", "params (K)", "compression", "theor. speedup", "sparsity (%)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = r["label"] if r["control"] in ("", "dense_finetune") else f"&nbsp;&nbsp;&nbsp;{r['label']}"
        cells = [name, r["budget"] or "-", str(r["seeds"]) + (f" ({r['missing']} missing)" if r["missing"] else "")]
        cells += [_pm(r, "top1"), *([_pm(r, "top5")] if top5 else []), _pm(r, "vs dense", True)]
        cells += [_pm(r, "vs dense-FT", True), _num(r["MACs"], ".2f", 1e-6), _num(r["FLOPs (2 x MACs)"], ".2f", 1e-6)]
        cells += [_num(r["params"], ".1f", 1e-3), _num(r["compression"], ".2f") + ("x" if r["compression"] else "")]
        cells += [_num(r["theoretical speedup"], ".2f") + ("x" if r["theoretical speedup"] else "")]
        cells.append(_num(r["sparsity"], ".1f", 100))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Speed and search cost", ""]
    device = sorted({r[f"latency {k}"] for r in rows for k in ("device",) if r.get(f"latency {k}")})
    threads = sorted({r["latency threads"] for r in rows if r.get("latency threads")})
    fmt = sorted({r["latency format"] for r in rows if r.get("latency format")})
    if device:
        lines += [
            f"Latency measured on {', '.join(device)}, {', '.join(threads)} thread(s); deployed = "
            f"{', '.join(fmt)}. Median over interleaved rounds with the dense model; speedup = dense / pruned.",
            "",
        ]
    batches = sorted({int(m.group(1)) for r in rows for k in r if (m := re.fullmatch(r"latency b(\d+) eager ms", k))})
    header = ["", "budget", *(f"b{b} {f} ms (speedup)" for b in batches for f in ("eager", "deployed"))]
    header += ["wall (s)", "train epochs", "dense-epoch eq.", "wall in dense epochs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["label"], r["budget"] or "-"]
        for b in batches:
            for form in ("eager", "deployed"):
                ms, speed = r.get(f"latency b{b} {form} ms"), r.get(f"speedup b{b} {form}")
                cells.append("" if ms is None else f"{ms:.3g} ({speed:.2f}x)")
        cells += [_num(r["wall s"], ".1f"), _num(r["train epochs"], ".2f"), _num(r["dense-epoch eq"], ".2f")]
        cells.append(_num(r["wall in dense epochs"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    published = [r for r in rows if r.get("published acc") is not None]
    if published:
        lines += ["", "## Beside the published figures", ""]
        lines += [
            "Gap = our top-1 minus the published; since the dense models differ, each drop is against its own dense "
            f"model. A published row matches ours by method and the nearest speedup within {ANCHOR_TOLERANCE:.0%}.",
            "",
            "| | budget | ours | published | at | gap | our drop | published drop | source |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in published:
            lines.append(
                f"| {r['label']} | {r['budget']} | {_pm(r, 'top1')} | {r['published acc']:.2f} | {r['published at']} "
                f"| {r['gap']:+.2f} | {_num(r['our drop'], '+.2f')} | {_num(r['published drop'], '+.2f')} "
                f"| {r['published source']} |"
            )
    lines += ["", "## Reading", "", *reading(rows)]
    if missing:
        lines += ["", "## Missing cells (no summary.json yet)", ""]
        lines += [f"- {c.id}: {_label(c.method, c.control)}, budget {c.budget}, seed {c.seed}" for c in missing]
    return "\n".join(lines) + "\n"


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method and budget: against its random control, against the dense fine-tuned, and its cost."""
    lines = []
    for r in (r for r in rows if r["control"] == ""):
        text = f"- **{r['label']}** at {r['budget']}: top-1 {mean_std(r['top1 values']) if r['top1 values'] else '?'}"
        if "vs random control" in r:
            diff, stds = r["vs random control"], r["random control stds"]
            if r["beats random control"] is None:
                verdict = f"{diff:+.2f} points against its random control (one seed: no spread to judge it by)"
            elif r["beats random control"]:
                verdict = (
                    f"beats its random control by {diff:+.2f} points, more than the two stds together ({stds:.2f})"
                )
            elif diff < -stds:
                verdict = f"loses to its random control by {-diff:.2f} points, more than the two stds ({stds:.2f})"
            else:
                verdict = f"is within noise of its random control: {diff:+.2f} points, the two stds together {stds:.2f}"
            text += "; " + verdict
        else:
            text += "; no random control finished"
        if r.get("vs dense-FT mean") is not None:
            text += f"; {r['vs dense-FT mean']:+.2f} against the dense model fine-tuned as long"
        if r.get("wall s") is not None:
            cost = f"; cost {r['wall s']:.0f} s wall (search and fine-tuning)"
            if r.get("dense-epoch eq") is not None:
                cost += f", {r['dense-epoch eq']:.2f} dense-epoch equivalents"
            text += cost
        lines.append(text + ".")
    return lines or ["- no method cell finished."]


MARKERS = "osD^v<>ph*"
CONTROL_MARKERS = {"random_channels": "x", "random_mask": "x", "scratch_e": "+", "scratch_b": "P", "reinit_mask": "1"}


def _plot(rows: list[dict[str, Any]], x: str, xlabel: str, png: Path) -> None:
    """Top-1 against `x`: methods with filled markers, controls with line markers, seed stds as error bars; on the
    MACs plot the matched published figures as hollow circles, at our dense MACs / the published speedup."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    colours: dict[str, Any] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["control"] == ""))
    for r in rows:
        if r.get(x) is None or r["top1 mean"] is None:
            continue
        scale = 1e-6 if x == "MACs" else 1.0
        marker = CONTROL_MARKERS.get(r["control"], "s") if r["control"] else MARKERS[methods.index(r["method"]) % 10]
        colour = colours.get(r["method"])
        label = f"{r['label']} {r['budget']}".strip()
        yerr = [r["top1 std"] or 0.0]
        point = {"marker": marker, "color": colour, "label": label, "capsize": 3, "linestyle": "none"}
        line = ax.errorbar([r[x] * scale], [r["top1 mean"]], yerr=yerr, **point)
        colours.setdefault(r["method"], line[0].get_color())
        if x == "MACs" and r.get("published acc") is not None:
            at = r["dense MACs"] / r["published speedup"] if r["published speedup"] and r["dense MACs"] else r[x]
            hollow = {"facecolors": "none", "edgecolors": colours[r["method"]], "marker": "o", "s": 90}
            ax.scatter([at * scale], [r["published acc"]], label=f"{r['label']}: {r['published source']}", **hollow)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def log_wandb(rows: list[dict[str, Any]], report: Path, name: str) -> Path:
    """The rows as a W&B table in an offline run under `report`/wandb (`wandb sync` uploads it later)."""
    import wandb

    columns: list[str | int] = list(dict.fromkeys(k for r in rows for k in r if k != "top1 values"))
    data = [[r.get(str(c)) for c in columns] for r in rows]
    table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
    run = wandb.init(project="prunelab-bench", name=name, dir=str(report), mode="offline", reinit=True)
    run.log({"report_card": table})
    run.finish()
    return report / "wandb"


def main(argv: Sequence[str] | None = None) -> None:
    """The `python -m prunelab.card` command."""
    parser = argparse.ArgumentParser(prog="python -m prunelab.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a protocol's output folder (protocol.yaml, cells/)")
    parser.add_argument("--anchors", default=None, help="the anchor table's setting (default: the protocol's)")
    parser.add_argument(
        "--anchor-table", type=Path, default=None, help="a YAML anchor table (default: the shipped one)"
    )
    parser.add_argument("--wandb", action="store_true", default=None, help="log the rows as an offline W&B table")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        report_card(args.out, args.anchors, args.anchor_table, wandb=args.wandb, plots=not args.no_plots)
    except (FileNotFoundError, KeyError) as error:
        raise SystemExit(f"prunelab.card: {error.args[0]}") from None
    print((args.out / "report" / "card.md").read_text(), end="")


if __name__ == "__main__":
    main()
