"""Dashboards: the W&B run (offline) holds the flat config, the tags, each prune's per-layer table and bar
chart, the per-round curve and the final model as an artifact; the same plots are PNG files in the run."""

from __future__ import annotations

import csv

from conftest import make_cfg

from prunelab import pipeline

FAST = ["latency.batch_sizes=[]", "quiet=true", "trainer.limit_val_batches=1"]


def test_an_offline_wandb_run_holds_the_config_tags_tables_plots_and_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(tmp_path, "method=imp", "method.rounds=2", "logger=wandb", "logger.log_model=true", *FAST)
    summary = pipeline.run(cfg, tmp_path)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    record = next(offline.glob("run-*.wandb")).read_bytes()
    # The flat config, the tags, the charts and the model artifact are in the run's record.
    for expected in (
        b"method.rounds",
        b"optimizer.lr",
        b"dataset=SyntheticDataModule",
        b"method=IMP",
        b"backbone=resnet_tiny",
        b"round1/prune/layers_bar",
        b"round2/prune/layers",
        b"rounds_curve",
        b"model.pt",
        b"model.ts",
    ):
        assert expected in record, expected
    media = offline / "files" / "media"
    assert len(list(media.glob("table/round*/prune/layers_*.table.json"))) == 2
    assert list(media.glob("table/rounds_*.table.json")) and list(media.glob("images/round1/prune/layers_png_*.png"))
    # The same plots for users without W&B.
    for r in (1, 2):
        rows = list(csv.DictReader((tmp_path / "stages" / f"r{r}-0-prune" / "layers.csv").open()))
        kept = sum(int(row["kept"]) for row in rows) / sum(int(row["total"]) for row in rows)
        assert abs(kept - (1 - summary[f"round{r}/sparsity"])) < 1e-9
        assert (tmp_path / "stages" / f"r{r}-0-prune" / "layers.png").stat().st_size > 0
    assert (tmp_path / "rounds.png").stat().st_size > 0


def test_a_structured_prune_writes_kept_channels_per_group(tmp_path):
    cfg = make_cfg(tmp_path, "method=l1_filter", "budget.flops=0.5", "retrain.epochs=1", *FAST)
    pipeline.run(cfg, tmp_path)
    (stage,) = (tmp_path / "stages").glob("*-prune")
    rows = list(csv.DictReader((stage / "layers.csv").open()))
    import json

    plan = json.loads((stage / "plan.json").read_text())
    assert {row["layer"]: int(row["kept"]) for row in rows} == {name: len(keep) for name, keep in plan["keep"].items()}
    assert (stage / "layers.png").exists() and not (tmp_path / "rounds.png").exists()
