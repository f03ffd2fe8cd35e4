"""Result tables from sweeps: mean and standard deviation over seeds, read from run directories alone."""

from __future__ import annotations

import statistics

import pytest

from conftest import make_cfg
from prunelab import pipeline
from prunelab.report import find_runs, markdown_table, table


def test_table_averages_seeds_and_skips_unfinished_runs(tmp_path):
    accs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        accs.append(pipeline.run(make_cfg(run_dir, f"seed={seed}", "latency.batch_sizes=[]"), run_dir)["test/acc"])
    # A run that never finished has no summary and must not count.
    (tmp_path / "unfinished" / "stages").mkdir(parents=True)
    (tmp_path / "unfinished" / "config.yaml").write_text("seed: 9\n")

    runs = find_runs([tmp_path])
    assert len(runs) == 3
    (row,) = table(runs, by=["backbone.name"], metrics=["test/acc"], out=tmp_path / "out")
    assert row["runs"] == 2 and row["backbone.name"] == "resnet_tiny"
    assert row["test/acc mean"] == pytest.approx(statistics.fmean(accs))
    assert row["test/acc std"] == pytest.approx(statistics.stdev(accs))
    text = (tmp_path / "out" / "table.md").read_text()
    assert text == markdown_table([row], ["backbone.name"], ["test/acc"])
    assert f"{row['test/acc mean']:.4g} +- {row['test/acc std']:.2g}" in text
    assert (tmp_path / "out" / "table.csv").read_text().startswith("backbone.name,runs,test/acc mean")
