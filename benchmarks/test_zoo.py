"""The checks of benchmarks/zoo.py, run by hand with `pytest benchmarks`."""

from __future__ import annotations

import csv
import sys

import zoo


def test_zoo_summary_names_the_largest_costs_and_grids_every_model(tmp_path, capsys, monkeypatch):
    """The summary, from the CSV a run writes: counts, FLOPs range and maxima of ok rows with their
    models, a failed row's status in the grid; the same from `--summary CSV` as at the end of the run."""
    rows = [
        {
            "model": "timm:a",
            "pl_status": "ok",
            "pl_flops_ratio": 0.49,
            "pl_groups_s": 3.0,
            "pl_groups_peak_gb": 0.2,
            "pl_total_s": 9.0,
            "pl_peak_gb": 1.5,
            "pl_max_diff": 0.0,
            "tp_status": "ok",
        },
        {
            "model": "torchvision:b",
            "pl_status": "ok",
            "pl_flops_ratio": 0.51,
            "pl_groups_s": 1.0,
            "pl_groups_peak_gb": 0.9,
            "pl_total_s": 12.0,
            "pl_peak_gb": 0.5,
            "pl_max_diff": 0.0,
            "tp_status": "prune: ZeroDivisionError",
        },
        {"model": "timm:c", "pl_status": "check: UnprunableError: cannot prune", "pl_total_s": 50.0, "tp_status": "ok"},
    ]
    lines = zoo.summary(rows, per_line=2)
    assert lines[:6] == [
        "prunelab: 2 ok / 3; FLOPs kept 0.490-0.510",
        "torch-pruning: 2 ok / 3",
        "group discovery: at most 3.0 s (a)",
        "group discovery: at most 0.90 GB (b)",
        "the whole path: at most 12.0 s (b)",
        "the whole path: at most 1.50 GB (a)",
    ]
    assert lines[-2:] == [
        "| a 0.490 / 9 s / 1.50 GB | b 0.510 / 12 s / 0.50 GB |",
        "| c: check: UnprunableError: cannot prune |  |",
    ]
    path = tmp_path / "zoo.csv"
    with path.open("w", newline="") as f:
        table = csv.DictWriter(f, [key for key, _ in zoo.COLUMNS] + zoo.CSV_ONLY, extrasaction="ignore")
        table.writeheader()
        table.writerows(rows)
    monkeypatch.setattr(sys, "argv", ["zoo.py", "--summary", str(path)])
    zoo.main()
    assert capsys.readouterr().out.splitlines() == zoo.summary(rows)
