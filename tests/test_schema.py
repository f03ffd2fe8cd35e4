"""The typed configuration (prunelab.schema): a wrong type, an unknown key or choice, an out-of-range value,
unreadable data or an unwritable output folder stop a command in one line (exit 2), before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONF_DIR, make_cfg, preset, run_cli
from omegaconf import OmegaConf

from prunelab import api, pipeline
from prunelab.errors import ConfigError
from prunelab.export import FORMATS
from prunelab.schema import CHOICES, EXPORT_FORMATS, BudgetConfig, RetrainConfig, RetrainMode, Scope


@pytest.mark.parametrize(
    "args, message",
    [
        (["seed=abc"], "seed: Value 'abc' of type 'str' could not be converted to Integer"),
        (["retrain.mode=sideways"], "retrain.mode: Invalid value 'sideways', expected one of [finetune, none"),
        (["budget.flopz=0.5"], "budget.flopz is not a setting"),
        (["budget.flops=abc"], "budget.flops: Value 'abc' of type 'str' could not be converted to Float"),
        (["export.format=tflite"], "export.format: Invalid value 'tflite'"),
        (["budget.scope=everywhere"], "budget.scope: Invalid value 'everywhere', expected one of [global, layer]"),
        (["dataset.batch_size=1.5"], "dataset.batch_size: Value '1.5' of type 'float' could not be converted"),
        (["trainer.max_epochs=ten"], "trainer.max_epochs: Value 'ten'"),
        (["dataset=cifar10", "dataset.download=maybe"], "dataset.download: Value 'maybe' is not a valid bool"),
        (["test=sometimes"], "test: Value 'sometimes' is not a valid bool"),
        (["latency.batch_sizes=[1,x]"], "latency.batch_sizes"),
        # Ranges and files: what a type cannot say, checked right after composing.
        (["method=l1_filter", "budget.flops=1.5"], "budget.flops=1.5 is out of range"),
        (["dataset.batch_size=0"], "dataset.batch_size=0 must be a whole number >= 1"),
        (["backbone.pretrained=/no/such/file.th"], "backbone.pretrained=/no/such/file.th: no such file"),
        (["paths.output_root=/etc/passwd/runs"], "paths.output_root=/etc/passwd/runs: cannot write there"),
        # A sweep: every combination is composed and checked, not only the first.
        (["seed=0,1", "budget.flops=0.5,2", "-m"], "budget.flops=2.0 is out of range"),
        (["seed=0,x", "--multirun"], "seed: Value 'x'"),
    ],
)
def test_a_mistake_is_refused_when_the_config_is_composed(args, message):
    with pytest.raises(ConfigError) as caught:
        api.check_command(args)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_command_refuses_in_one_line_with_exit_code_2_before_loading_anything(tmp_path):
    for args, message in [
        (["seed=abc"], "prunelab: error: seed: Value 'abc'"),
        (["retrain.mode=sideways", "method=l1_filter", "budget.flops=0.5"], "prunelab: error: retrain.mode: Invalid"),
    ]:
        out = run_cli(*args, cwd=tmp_path)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and lines == [lines[0]] and lines[0].startswith(message), out.stderr[-2000:]
        assert not (tmp_path / "outputs").exists()


def test_what_the_check_leaves_alone_still_runs_through_hydra():
    # Hydra's own flags and settings, a sweeper's intervals, and its help need no composed experiment.
    api.check_command(["--help"])
    api.check_command(["--cfg", "job", "hydra.run.dir=/tmp/x", "seed=1"])
    api.check_command(["method=pfs", "method.gamma=interval(0.1,1.0)", "budget.flops=0.5", "-m"])
    api.check_command(["+trainer.num_nodes=1", "+dataset.subset=100"])


def test_every_preset_composes_on_the_schema():
    presets = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert len(presets) >= 70
    for name in presets:
        # Composing is the schema check (presets may leave paths for the command line to set).
        cfg = preset(name)
        assert OmegaConf.get_type(cfg.budget) is BudgetConfig and OmegaConf.get_type(cfg.retrain) is RetrainConfig


def test_choices_read_as_their_values():
    cfg = make_cfg(Path("unused"), "retrain=rewind", "budget.scope=layer")
    mode, scope = cfg.retrain.mode, cfg.budget.scope
    assert isinstance(mode, RetrainMode) and mode == "rewind" and mode in ("rewind",) and f"{mode}" == "rewind"
    assert scope == "layer" and scope is Scope["layer"] and {"layer": 1}[scope] == 1
    assert json.loads(json.dumps(OmegaConf.to_container(cfg.retrain)))["mode"] == "rewind"
    assert "mode: rewind" in OmegaConf.to_yaml(cfg.retrain)
    # One list of export formats: the schema's and the files the export writes.
    assert set(EXPORT_FORMATS) == set(FORMATS) and CHOICES["export.format"] == EXPORT_FORMATS


def test_data_that_cannot_serve_the_settings_stops_before_training_in_one_line(tmp_path):
    cfg = make_cfg(tmp_path, "dataset.val_size=100000", "latency.batch_sizes=[]")
    with pytest.raises(ConfigError) as caught:
        pipeline.run(cfg, tmp_path)
    assert "val_size=100000 must be smaller than the number of training images" in str(caught.value)
    assert "\n" not in str(caught.value) and not (tmp_path / "stages").exists()
