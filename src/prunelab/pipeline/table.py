"""The before/after table printed at the end of a run: the dense and the final model, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunelab.report import round_rows


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """A before/after table of the dense and the final model, and where the full summary is."""
    from rich.console import Console
    from rich.table import Table

    rows = [("accuracy (%)", "dense/test/acc", "test/acc"), ("FLOPs (MACs)", "dense/flops", "model/flops")]
    rows.append(("parameters", "dense/params", "model/params"))
    batches = sorted(
        {int(k[len("model/latency_b") :].split("_")[0]) for k in summary if k.startswith("model/latency_b")}
    )
    for b in batches:
        rows.append((f"latency batch {b} (ms, eager)", f"dense/latency_b{b}_ms", f"model/latency_b{b}_ms"))
        rows.append(
            (f"latency batch {b} (ms, deployed)", f"dense/deployed_latency_b{b}_ms", f"model/deployed_latency_b{b}_ms")
        )
    table = Table(title="prunelab summary")
    for column in ("", "dense", "final", "final / dense"):
        table.add_column(column, justify="right" if column else "left", no_wrap=not column)
    for label, dense_key, final_key in rows:
        dense, final = summary.get(dense_key), summary.get(final_key)
        cells = [_fmt(dense), _fmt(final), f"{final / dense:.3f}" if dense and final is not None else ""]
        if "latency" in final_key and summary.get(f"{final_key}_min") is not None:
            # A latency is the median over interleaved rounds, with its fastest and slowest round; the ratio the
            # inverse of the median speedup, with the rounds' range.
            speedup = final_key.replace("latency", "speedup").removesuffix("_ms")
            cells = [
                _with_range(dense, summary.get(f"{dense_key}_min"), summary.get(f"{dense_key}_max"), _fmt),
                _with_range(final, summary.get(f"{final_key}_min"), summary.get(f"{final_key}_max"), _fmt),
                _with_range(
                    1 / summary[speedup], 1 / summary[f"{speedup}_max"], 1 / summary[f"{speedup}_min"], "{:.3f}".format
                ),
            ]
        table.add_row(label, *cells)
    if summary.get("model/latency_ratio") is not None:
        table.add_row(
            "latency budget (final / dense)",
            "",
            "",
            _with_range(
                summary["model/latency_ratio"],
                summary.get("model/latency_ratio_min"),
                summary.get("model/latency_ratio_max"),
                "{:.3f}".format,
            ),
        )
    table.add_row("weight sparsity", "", _fmt(summary.get("model/sparsity")), "")
    console = Console()
    console.print(table)
    if batches and summary.get("model/flops"):
        speedups = ", ".join(
            f"{_speedup(summary, f'model/deployed_speedup_b{b}')} at batch {b} (eager "
            f"{_speedup(summary, f'model/speedup_b{b}')})"
            for b in batches
            if summary.get(f"model/deployed_speedup_b{b}") and summary.get(f"model/speedup_b{b}")
        )
        how = (
            f", median of {summary['latency/rounds']} interleaved rounds (lowest-highest round)"
            if summary.get("latency/rounds", 1) > 1
            else ""
        )
        console.print(
            f"deployed ({summary.get('latency/format')}, {summary.get('latency/device')}, "
            f"{summary.get('latency/threads')} threads{how}): {speedups} for "
            f"{summary['dense/flops'] / summary['model/flops']:.2f}x fewer FLOPs"
        )
    rounds = round_rows(summary)
    if rounds:
        per_round = Table(title="rounds")
        for column in ("round", "sparsity", "FLOPs ratio", "test accuracy (%)"):
            per_round.add_column(column, justify="right")
        for row in rounds:
            per_round.add_row(str(row["round"]), _fmt(row["sparsity"]), _fmt(row["flops_ratio"]), _fmt(row["test/acc"]))
        console.print(per_round)
    console.print(f"run directory: {run_dir}  (all metrics in summary.json)")


def _with_range(value: float, low: float | None, high: float | None, form) -> str:
    """A median (formatted by `form`) over the range of its rounds, "1.230\n(1.10-1.31)", or the median alone without a
    range. The range has three significant digits or two decimals, to fit an 80-column table."""
    if low is None or high is None or low == high:
        return form(value)
    short = lambda v: f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"  # noqa: E731
    return f"{form(value)}\n({short(low)}-{short(high)})"


def _speedup(summary: dict[str, Any], key: str) -> str:
    """A speedup with the range of its rounds; one whose range holds 1.0 is no measured speedup or slowdown."""
    median, low, high = summary[key], summary.get(f"{key}_min"), summary.get(f"{key}_max")
    if low is None or high is None or low == high:
        return f"{median:.2f}x"
    return f"{median:.2f}x ({low:.2f}-{high:.2f}{', within noise' if low <= 1.0 <= high else ''})"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return f"{value:,}"
