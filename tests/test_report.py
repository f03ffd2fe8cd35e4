"""Result tables from sweeps: mean and standard deviation over seeds, read from run directories alone."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import make_cfg

from prunelab import pipeline, report
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


def test_rounds_report_averages_seeds_per_round_and_plots(tmp_path, capsys):
    import json
    import shutil

    from prunelab.report import main, rounds_table

    summaries = []
    for seed in (0, 1):
        run_dir = tmp_path / "sweep" / f"seed{seed}"
        cfg = make_cfg(
            run_dir,
            f"seed={seed}",
            "method=imp",
            "method.rounds=2",
            "latency.batch_sizes=[]",
            "trainer.limit_val_batches=1",
        )
        summaries.append(pipeline.run(cfg, run_dir))
    rows = rounds_table(find_runs([tmp_path / "sweep"]), by=["method"], out=tmp_path / "out")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        accs = [s[f"round{row['round']}/test/acc"] for s in summaries]
        # Without Hydra's record of the group choice (runs started from Python) the class name stands in.
        assert row["runs"] == 2 and row["method"] == "IMP"
        assert row["test/acc mean"] == pytest.approx(statistics.fmean(accs))
        assert row["test/acc std"] == pytest.approx(statistics.stdev(accs))
        assert row["sparsity mean"] == pytest.approx([0.0, 0.2, 0.36][row["round"]], abs=1e-4)
    assert (tmp_path / "out" / "rounds.png").stat().st_size > 1000
    assert (tmp_path / "out" / "rounds.csv").read_text().startswith("method,round,runs,sparsity mean")

    # A run still in round 2 counts with the rounds it finished (read from its stages' done.json).
    partial = tmp_path / "sweep" / "partial"
    shutil.copytree(tmp_path / "sweep" / "seed0", partial)
    (partial / "summary.json").unlink()
    for stage in ("r2-2-test", "8-test"):
        (partial / "stages" / stage / "done.json").unlink()
    main(["rounds", str(tmp_path / "sweep")])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| IMP |")]
    assert [line.split("|")[3].strip() for line in lines] == ["3", "3", "2"]
    assert "20.00" in printed and json.loads((partial / "stages.json").read_text())[0]["dir"] == "r0-0-train"


def test_cost_of_a_one_shot_prune_stage_is_its_total_against_a_dense_epoch(tmp_path):
    """`report cost RUN RUN --search-stage prune --dense-stage pretrain` (greedy imitation's search has no epochs)."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "config.yaml").write_text("pretrain:\n  epochs: 4\ntrainer:\n  max_epochs: 9\n")
    (tmp_path / "summary.json").write_text(json.dumps({"time/prune_s": 30.0, "time/pretrain_s": 20.0}))
    report.main(["cost", str(tmp_path), str(tmp_path), "--search-stage", "prune", "--dense-stage", "pretrain"])
    cost = json.loads((tmp_path / "search_cost.json").read_text())
    assert cost["search_epochs"] is None and cost["search_epoch_over_dense_epoch"] is None
    assert cost["dense_epochs"] == 4 and cost["dense_epoch_s"] == 5.0 and cost["search_in_dense_epochs"] == 6.0


def _fake_run(path, method: str, flops: float, seed: int, ratio: float, acc: float, paper: str = "null"):
    (path / "stages").mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"method:\n  _target_: prunelab.methods.{method}\nbudget:\n  flops: {flops}\nseed: {seed}\npaper: {paper}\n"
    )
    (path / "summary.json").write_text(json.dumps({"model/flops_ratio": ratio, "test/acc": acc}))


def test_pareto_averages_seeds_per_method_and_budget_and_overlays_the_papers_points(tmp_path):
    paper = "{acc: 93.0, flops: 0.5, source: Table 1}"
    for seed, (a, b) in enumerate([(90.0, 80.0), (92.0, 84.0)]):
        _fake_run(tmp_path / f"l1_f50_s{seed}", "L1Filter", 0.5, seed, 0.50 + 0.01 * seed, a, paper)
        _fake_run(tmp_path / f"l1_f25_s{seed}", "L1Filter", 0.25, seed, 0.25, b, paper)
        _fake_run(tmp_path / f"uni_f50_s{seed}", "Uniform", 0.5, seed, 0.49, a - 1)
    points, papers = report.pareto(find_runs([tmp_path]), x="flops", by=["method"], out=tmp_path)
    by = {(p["method"], p["budget.flops"]): p for p in points}
    assert set(by) == {("L1Filter", "0.5"), ("L1Filter", "0.25"), ("Uniform", "0.5")}
    assert by[("L1Filter", "0.5")]["runs"] == 2 and by[("L1Filter", "0.5")]["test/acc mean"] == 91.0
    assert by[("L1Filter", "0.5")]["test/acc std"] == pytest.approx(statistics.stdev([90.0, 92.0]))
    assert by[("L1Filter", "0.5")]["flops mean"] == pytest.approx(0.505)
    assert papers == [{"method": "L1Filter", "flops": 0.5, "acc": 93.0, "source": "Table 1"}]
    assert {f.name for f in tmp_path.iterdir()} >= {"pareto.csv", "pareto.md", "pareto.png"}
    assert "| L1Filter | 0.25 | 2 | 25.00 +- 0.00 | 82.00 +- 2.83 |" in (tmp_path / "pareto.md").read_text()
    with pytest.raises(ValueError, match="x must be one of"):
        report.pareto(find_runs([tmp_path]), x="latency")


def test_table_gives_timed_metrics_the_range_of_their_rounds(tmp_path):
    # Two seeds' speedups, each a median over rounds with its lowest and highest round: the table keeps the lowest and
    # highest round of all, and a speedup whose rounds straddle 1.0 reads as within noise, a clear one does not.
    speedups = [(1.05, 0.93, 1.14, 2.1, 1.9, 2.3), (0.98, 0.91, 1.08, 2.0, 1.95, 2.2)]
    runs = [
        report.Run(
            tmp_path / f"seed{seed}",
            None,
            {
                "model/deployed_speedup_b1": d,
                "model/deployed_speedup_b1_min": d_lo,
                "model/deployed_speedup_b1_max": d_hi,
                "model/speedup_b1": e,
                "model/speedup_b1_min": e_lo,
                "model/speedup_b1_max": e_hi,
                "test/acc": 90.0,
            },
        )
        for seed, (d, d_lo, d_hi, e, e_lo, e_hi) in enumerate(speedups)
    ]
    metrics = ["model/deployed_speedup_b1", "model/speedup_b1", "test/acc"]
    (row,) = table(runs, by=["seed"], metrics=metrics, out=tmp_path / "out")
    assert (row["model/deployed_speedup_b1 min"], row["model/deployed_speedup_b1 max"]) == (0.91, 1.14)
    assert "test/acc min" not in row
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| 1.015 +- 0.049 (rounds 0.91-1.14, within noise) | 2.05 +- 0.071 (rounds 1.9-2.3) | 90 +- 0 |" in text


def test_two_runs_compare_by_their_plans_and_their_losses_before_the_first_prune(tmp_path):
    """prunelab.runs.plan_difference and losses_before_pruning, what the DDP check compares a run with."""
    from prunelab.runs import losses_before_pruning, plan_difference

    fast = [
        "pretrain.epochs=1",
        "retrain=none",
        "trainer.limit_train_batches=3",
        "latency.batch_sizes=[]",
        "quiet=true",
    ]
    for name, flops in (("a", 0.5), ("b", 0.5), ("c", 0.3)):
        pipeline.run(make_cfg(tmp_path / name, "method=l1_filter", f"budget.flops={flops}", *fast), tmp_path / name)
    pipeline.run(make_cfg(tmp_path / "dense", "method=dense", *fast), tmp_path / "dense")
    assert plan_difference(tmp_path / "a", tmp_path / "b") == 0.0
    assert 0.0 < plan_difference(tmp_path / "a", tmp_path / "c") < 1.0
    assert plan_difference(tmp_path / "a", tmp_path / "dense") == 1.0  # not the same prune stages
    losses = losses_before_pruning(tmp_path / "a")
    assert len(losses) == 3 and losses == losses_before_pruning(tmp_path / "c")
