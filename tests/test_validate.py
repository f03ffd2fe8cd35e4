"""Reliability: bad settings stop a run before any work, with one clear message; non-finite numbers
stop it too; one process writes a run directory at a time."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import FAST, make_cfg, run_cli

from prunelab import pipeline
from prunelab.io import RunLock
from prunelab.validate import ConfigError, NonFiniteError, PrunelabError

QUIET = ["latency.batch_sizes=[]", "trainer.limit_val_batches=1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=l1_filter", "budget.flops=1.5", "pretrain.epochs=3"], "budget.flops=1.5 is out of range"),
        (["method=magnitude", "budget.sparsity=1.0"], "budget.sparsity=1.0 is out of range"),
        (["method=l1_filter", 'budget.layer_ratios=["1-999:0.7"]'], "reaches layer 999"),
        (["method=l1_filter", "budget.layer_ratios=[0.5,0.5]"], "has 2 entries, but the model has 5 stages"),
        (["method=l1_filter", 'budget.layer_ratios=["3-1:0.5"]'], "is reversed"),
        (["method=l1_filter", "budget.layer_ratios=[0,1.0,0,0,0]"], "in [0, 1)"),
        (["backbone.width=-1"], "backbone.width=-1 is out of range"),
        (["dataset.batch_size=0"], "dataset.batch_size=0 must be a whole number >= 1"),
        (["optimizer.lr=0"], "optimizer.lr=0 is out of range"),
        (["backbone.pretrained=/no/such/file.th"], "backbone.pretrained=/no/such/file.th: no such file"),
        (
            ["method=l1_filter"],
            "L1Filter prunes to a budget: set budget.flops or budget.params or budget.latency or budget.layer_ratios",
        ),
        (["method=magnitude"], "Magnitude prunes to a budget: set budget.sparsity"),
        (["method=pfs"], "pfs: the target ratio r"),
        (["method=imp"], "imp needs budget.sparsity"),
        (["method=jackpot", "pretrain.epochs=2"], "Jackpot prunes to a budget: set budget.sparsity"),
        (
            ["method=jackpot", "budget.sparsity=0.9", "method.allocation=per_layer"],
            "method.allocation='per_layer' is not one of",
        ),
        (
            ["method=edge_popup", "budget.sparsity=0.9", "method.epochs=0"],
            "edgepopup: method.epochs=0 must be a whole number",
        ),
        (["method=jackpot", "budget.sparsity=0.9", "method.overlap_with=[l1]"], "unknown criteria ['l1']"),
        (
            [
                "method=l1_filter",
                "budget.flops=0.5",
                "retrain=rewind",
                "retrain.rewind_iteration=1000",
                "pretrain.epochs=1",
            ],
            "retrain.rewind_iteration=1000 is past the 7 optimizer steps",
        ),
        (["dataset=cifar10", "dataset.root=/no/such/dir"], "CIFAR-10 not found: looked for /no/such/dir"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as caught:
        pipeline.run(make_cfg(tmp_path, *QUIET, *overrides), tmp_path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    # Nothing ran: no stage directory, no model, no summary.
    assert not (tmp_path / "stages").exists() and not (tmp_path / "summary.json").exists()


def test_a_diverging_run_stops_with_the_stage_and_step_and_writes_nothing_complete(tmp_path):
    with pytest.raises(NonFiniteError, match=r"stage train: the training loss is (nan|inf) at step \d+ \(epoch 0\)"):
        pipeline.run(make_cfg(tmp_path, *QUIET, "optimizer.lr=1e12", "trainer.max_epochs=2"), tmp_path)
    assert not list(tmp_path.glob("stages/*/done.json")) and not (tmp_path / "summary.json").exists()


def test_summary_is_strict_json(tmp_path):
    pipeline.run(make_cfg(tmp_path, *QUIET), tmp_path)
    text = (tmp_path / "summary.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
    assert "val/acc" in json.loads(text)


def test_backbone_variant_follows_the_dataset(tmp_path):
    small = pipeline.run(
        make_cfg(tmp_path / "a", *QUIET, "backbone=mobilenet_v2_tiny", "trainer.max_epochs=0"), tmp_path / "a"
    )
    big = pipeline.run(
        make_cfg(
            tmp_path / "b", *QUIET, "backbone=mobilenet_v2_tiny", "trainer.max_epochs=0", "dataset.image_size=128"
        ),
        tmp_path / "b",
    )
    from prunelab import load_model

    assert load_model(tmp_path / "a" / "model.pt").prunelab.spec["variant"] == "cifar"
    assert load_model(tmp_path / "b" / "model.pt").prunelab.spec["variant"] == "imagenet"
    # The ImageNet stem downsamples 128-pixel inputs early: far fewer MACs than the CIFAR stem would cost.
    with pytest.warns(
        UserWarning, match=r"backbone.variant=cifar on 128-pixel images: [\d,.]+M MACs, against [\d,.]+M"
    ):
        forced = pipeline.run(
            make_cfg(
                tmp_path / "c",
                *QUIET,
                "backbone=mobilenet_v2_tiny",
                "trainer.max_epochs=0",
                "dataset.image_size=128",
                "backbone.variant=cifar",
            ),
            tmp_path / "c",
        )
    assert forced["dense/flops"] > 4 * big["dense/flops"] and small["dense/flops"] > 0


def test_one_writer_per_run_directory(tmp_path):
    code = (
        "import sys, time; from prunelab.io import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PrunelabError, match=rf"another prunelab process \(pid {holder.pid} on .*\) is writing"):
            pipeline.run(make_cfg(tmp_path, *QUIET), tmp_path)
        assert not (tmp_path / "stages").exists()
    finally:
        holder.kill()
        holder.wait()
    # The killed owner left its lock behind: a stale lock on this host is taken over with a warning.
    assert (tmp_path / ".lock").exists()
    with pytest.warns(UserWarning, match="no longer running"):
        pipeline.run(make_cfg(tmp_path, *QUIET), tmp_path)
    assert not (tmp_path / ".lock").exists() and (tmp_path / "summary.json").exists()
    lock = RunLock(tmp_path)
    with lock:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_torn_checkpoint_restarts_its_stage_with_a_warning(tmp_path, caplog):
    from conftest import CrashAtEpoch

    cfg = make_cfg(tmp_path, *QUIET, "trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, tmp_path, callbacks=[CrashAtEpoch(2)])
    last = tmp_path / "stages" / "0-train" / "checkpoints" / "last.ckpt"
    # Checkpoints are renamed into place, so no temporary file is left beside them.
    assert not list(last.parent.glob("*.tmp"))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="prunelab"):
        summary = pipeline.run(cfg, tmp_path)
    assert "is unreadable" in caplog.text and (last.parent / "last.ckpt.corrupt").exists()
    assert summary["train/steps"] == 3 * 7


def test_a_resumed_stage_reports_its_whole_time(tmp_path):
    import time

    from conftest import CrashAtEpoch

    class Slow(CrashAtEpoch):
        def on_train_epoch_start(self, trainer, pl_module):
            time.sleep(0.5)
            super().on_train_epoch_start(trainer, pl_module)

    cfg = make_cfg(tmp_path, *QUIET, "trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, tmp_path, callbacks=[Slow(2)])
    summary = pipeline.run(cfg, tmp_path, callbacks=[Slow(99)])
    # Two slow epochs before the crash and one after it: at least 1.5 s in all.
    assert summary["time/train_s"] >= 1.5


def test_log_lines_appear_once_without_other_libraries_info_and_quiet_keeps_only_the_summary(tmp_path):
    def messages(out):
        assert out.returncode == 0, out.stderr[-2000:]
        text = out.stdout + out.stderr
        assert "💡" not in text and "LeafSpec" not in text and "prunelab summary" in text
        return [re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[\w+\] - |^\w+: ", "", line) for line in text.splitlines()], text

    # An ONNX export runs the exporter's passes, whose INFO lines ("Replaced initializer ...") are off by default.
    command = [*FAST, "latency.batch_sizes=[]", "export.format=onnx"]
    for folder in ("default", "verbose"):
        (tmp_path / folder).mkdir()
    lines, text = messages(run_cli(*command, cwd=tmp_path / "default"))
    assert lines.count("stage train (fit) starting") == 1 and lines.count("stage test (test) starting") == 1
    assert not re.search(
        r"onnxscript|onnx_ir|GPU available|Seed set to|Replaced initializer|\[lightning[^\]]*\]\[INFO\]", text
    )

    # verbose_libraries=true brings them back, each line once (Lightning's console handler is not doubled).
    lines, text = messages(run_cli(*command, "verbose_libraries=true", cwd=tmp_path / "verbose"))
    assert lines.count("Seed set to 0") == 1 and lines.count("GPU available: False, used: False") == 2
    assert "[onnx_ir." in text and lines.count("stage train (fit) starting") == 1

    quiet = run_cli(*FAST, "latency.batch_sizes=[]", "quiet=true", "seed=1", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "[INFO]" not in quiet.stdout + quiet.stderr and "prunelab summary" in quiet.stdout


@pytest.mark.parametrize("verbose", [True, ("onnx_ir",), ("lightning",)])
def test_loggers_named_by_hydra_verbose_keep_their_level(verbose):
    names = ["prunelab", "lightning", "lightning.pytorch", "onnx", "onnxscript", "onnx_ir"]
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.DEBUG)
        pipeline.quiet_logs(quiet=False, libraries=False, verbose=verbose)
        levels = {name: logging.getLogger(name).level for name in names}
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    if verbose is True:
        assert set(levels.values()) == {logging.DEBUG}
    else:
        # A named logger and those under it keep Hydra's DEBUG; prunelab logs INFO, the other libraries WARNING.
        kept = {n for n in names if n == verbose[0] or n.startswith(verbose[0] + ".")}
        assert {n: lv for n, lv in levels.items() if n in kept} == dict.fromkeys(kept, logging.DEBUG)
        assert levels["prunelab"] == logging.INFO
        assert all(lv == logging.WARNING for n, lv in levels.items() if n not in kept and n != "prunelab")


def _comparable(summary: dict) -> dict:
    """A summary without what differs between any two runs (wall times, latencies)."""
    return {k: v for k, v in summary.items() if not k.startswith("time/") and "latency" not in k and "speedup" not in k}


PRETRAIN = ["method=l1_filter", "budget.flops=0.5", "budget.tolerance=0.05", "pretrain.epochs=2"]


# 7 training batches per epoch: a kill at validation after step 7 or 14 falls between an epoch's last
# step and its end (validation, scheduler step, epoch metrics); "at 4" is inside a search epoch that
# validates every 2 batches.
@pytest.mark.parametrize(
    "overrides, stage, step, at",
    [
        (["trainer.max_epochs=2"], "train", 10, "step"),
        ([*PRETRAIN], "pretrain", 9, "step"),
        ([*PRETRAIN], "pretrain", 7, "validation"),
        ([*PRETRAIN], "pretrain", 14, "validation"),
        (
            ["method=pfs", "budget.flops=0.5", "budget.tolerance=0.05", "method.epochs=2", "retrain.epochs=1"],
            "search",
            5,
            "step",
        ),
        (
            [
                "method=pfs",
                "budget.flops=0.5",
                "budget.tolerance=0.05",
                "method.epochs=2",
                "retrain.epochs=1",
                "method.val_check_interval=2",
            ],
            "search",
            4,
            "validation",
        ),
        (
            ["method=jackpot", "budget.sparsity=0.8", "method.epochs=2", "method.overlap_with=[magnitude]"],
            "search",
            11,
            "step",
        ),
    ],
    ids=[
        "dense",
        "pretrain",
        "pretrain-epoch-end",
        "pretrain-stage-end",
        "pfs-search",
        "pfs-mid-epoch-val",
        "jackpot-search",
    ],
)
def test_a_run_killed_inside_an_epoch_ends_bit_identically(tmp_path, overrides, stage, step, at):
    from conftest import CrashAtStep, CrashAtValidation

    args = [*QUIET, "checkpoint_every_n_steps=1", *overrides]
    reference = pipeline.run(make_cfg(tmp_path / "ref", *args), tmp_path / "ref")
    crash = CrashAtStep(step, stage) if at == "step" else CrashAtValidation(step, stage)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(make_cfg(tmp_path / "run", *args), tmp_path / "run", callbacks=[crash])
    resumed = pipeline.run(make_cfg(tmp_path / "run", *args), tmp_path / "run")
    assert _comparable(resumed) == _comparable(reference)
    for plan in (tmp_path / "ref").glob("stages/*/plan.json"):
        assert plan.read_text() == (tmp_path / "run" / plan.relative_to(tmp_path / "ref")).read_text()


@pytest.mark.slow
def test_a_run_killed_at_random_moments_several_times_ends_bit_identically(tmp_path):
    """SIGKILL the real command at random moments (training, pruning, testing, export) until it finishes."""
    import random
    import signal
    import time

    args = [
        *FAST,
        *QUIET,
        "checkpoint_every_n_steps=1",
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.05",
        "pretrain.epochs=4",
        "retrain.epochs=3",
    ]
    command = [sys.executable, "-m", "prunelab.cli", *args]

    def launch(root):
        env = {**os.environ, "PRUNELAB_OUTPUTS": str(root)}
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert launch(tmp_path / "ref").wait() == 0
    (reference,) = (tmp_path / "ref").glob("runs/*/summary.json")

    def files(root):
        """The run's outputs with their times: stage directories (checkpoints, plans, done marks) and the model."""
        found = [p for p in root.rglob("*") if p.is_file() and ("stages" in p.parts or p.name.startswith("model."))]
        return {(str(p), p.stat().st_mtime_ns) for p in found}

    # Each launch is killed a random moment (up to 0.4 s) after it first writes an output: a
    # checkpoint, a stage's output, the model, its export. So every launch gets past start-up and
    # makes progress, whatever the machine's speed, and the cuts land all through the run. After
    # `cuts` kills the run is left to finish.
    rng, root, kills, cuts = random.Random(0), tmp_path / "killed", 0, 8
    while True:
        before = files(root)
        process = launch(root)
        if kills < cuts:
            while process.poll() is None and not files(root) - before:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None and kills < cuts:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.wait() == 0
        break
    assert kills >= 3, f"the run finished before it was killed three times ({kills} kills)"
    (resumed,) = (tmp_path / "killed").glob("runs/*/summary.json")
    assert _comparable(json.loads(resumed.read_text())) == _comparable(json.loads(reference.read_text()))
