"""Growing Regularization (GReg-1, GReg-2): the penalty's schedule, its effect, budgets and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, CrashAtStep, make_cfg, preset
from hydra.utils import instantiate

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import count_flops
from prunelab.methods.greg import GReg1, GReg2
from prunelab.validate import ConfigError, check_config

QUIET = ["latency.batch_sizes=[]", "trainer.limit_val_batches=1", "retrain.epochs=1"]
# lambda grows 0.25 per update, every 2 iterations: 0.25 0.5 0.75 1.0 1.25 -> passes tau=1 at the 5th
# update, iteration 8; then 3 stabilisation steps: 11 steps in all.
GREG1 = [
    "method=greg1",
    "method.delta_lambda=0.25",
    "method.tau=1.0",
    "method.update_interval=2",
    "method.stabilize_steps=3",
    "method.lr=0.01",
    "budget.layer_ratios=[0,0.5,0.5,0.5]",
    "budget.prune_coupled=false",
]


def _run(tmp_path, *overrides, callbacks=None):
    return pipeline.run(make_cfg(tmp_path, *QUIET, *overrides), tmp_path, callbacks=callbacks)


def _history(run_dir):
    return json.loads((run_dir / "greg_history.json").read_text())


def _stage(run_dir, name):
    (found,) = run_dir.glob(f"stages/*-{name}")
    return found


def test_greg1_lambda_grows_exactly_as_algorithm_1_and_the_stage_ends_on_it(tmp_path):
    summary = _run(tmp_path, *GREG1)
    assert GReg1(delta_lambda=0.25, tau=1.0, update_interval=2, stabilize_steps=3).planned_steps() == 11
    assert summary["regularize/steps"] == 11
    # The fine-tuning after it runs its whole epoch (7 batches), not stopped by the method's condition.
    assert summary["finetune/steps"] == 7 and summary["finetune/end"] == "max_epochs"
    assert summary["regularize/end"] == "condition: lambda passed tau=1 at iteration 8, then 3 steps"
    history = _history(tmp_path)
    updates = history[:-1]  # the last entry is the state at the end of the stage
    assert [h["iteration"] for h in updates] == [0, 2, 4, 6, 8]
    assert [h["lambda"] for h in updates] == [0.25, 0.5, 0.75, 1.0, 1.25]
    assert all(h["lambda_kept"] == 0.0 for h in history)
    # Half the filters of the three penalised layers carry lambda: mean lambda / 2, max lambda.
    assert all(h["lambda_max"] == h["lambda"] and h["lambda_mean"] == pytest.approx(h["lambda"] / 2) for h in history)
    assert history[-1]["iteration"] == 11 and history[-1]["lambda"] == 1.25
    assert (tmp_path / "greg_norm_ratio.png").stat().st_size > 0
    # The penalty's values reach the logger as the stage's step metrics.
    assert summary["regularize/train/lambda"] == 1.25


def test_greg1_prunes_exactly_the_filters_one_shot_l1_prunes(tmp_path):
    ratios = ["budget.layer_ratios=[0,0.5,0.5,0.5]", "budget.prune_coupled=false"]
    _run(tmp_path / "greg", *GREG1)
    _run(tmp_path / "l1", "method=l1_filter", *ratios)
    greg = json.loads((_stage(tmp_path / "greg", "prune") / "plan.json").read_text())
    oneshot = json.loads((_stage(tmp_path / "l1", "prune") / "plan.json").read_text())
    assert greg == oneshot
    # Half the inner channels of every block go; the residual stream written by the stem and the first
    # block stays whole (prune_coupled=false).
    model = load_model(tmp_path / "greg" / "model.pt")
    dense = create("resnet_tiny")
    assert model.layer2[0].conv1.out_channels == dense.layer2[0].conv1.out_channels // 2
    assert model.layer1[0].conv2.out_channels == dense.layer1[0].conv2.out_channels


def test_penalised_filters_shrink_by_orders_of_magnitude(tmp_path):
    # lr * lambda stays below 1 (a stable decay). BatchNorm makes the loss blind to a filter's scale, so
    # its gradient grows as the filter shrinks: on this 100-step toy the gap settles near 45x (it takes
    # the paper's long schedules for the filters to reach BN's epsilon and vanish).
    _run(
        tmp_path,
        "method=greg1",
        "method.delta_lambda=1.0",
        "method.tau=100",
        "method.update_interval=1",
        "method.stabilize_steps=0",
        "method.lr=0.008",
        "budget.layer_ratios=[0,0.5,0.5,0.5]",
        "budget.prune_coupled=false",
    )
    history = _history(tmp_path)
    first, last = history[0], history[-1]
    # L1 picks the smaller half, so the kept filters start somewhat larger; the penalty opens the gap.
    assert 1.0 < first["norm_ratio"] < 3.0
    assert last["norm_ratio"] > 30 * first["norm_ratio"]
    assert last["pruned_mean_abs"] < first["pruned_mean_abs"] / 30


def test_greg2_grows_all_until_tau0_then_picks_and_gives_kept_filters_minus_gamma(tmp_path):
    args = [
        "method=greg2",
        "method.delta_lambda_pick=0.1",
        "method.tau0=0.25",
        "method.delta_lambda=0.5",
        "method.tau=1.0",
        "method.update_interval=1",
        "method.stabilize_steps=2",
        "method.weight_decay=0.001",
        "method.lr=0.01",
        "budget.layer_ratios=[0,0.5,0.5,0.5]",
        "budget.prune_coupled=false",
    ]
    summary = _run(tmp_path, *args)
    updates = _history(tmp_path)[:-1]
    # Picking: 0.1, 0.2, 0.3 on every candidate filter; 0.3 > tau0, so the 4th update picks and grows the
    # picked filters' penalty from there: 0.8, 1.3 (> tau = 1). Kept filters: -gamma once picked.
    assert [h["lambda"] for h in updates] == pytest.approx([0.1, 0.2, 0.3, 0.8, 1.3])
    assert [h["lambda_kept"] for h in updates] == pytest.approx([0.1, 0.2, 0.3, -0.001, -0.001])
    assert [h["lambda_max"] for h in updates] == pytest.approx([0.1, 0.2, 0.3, 0.8, 1.3])
    assert [h["lambda_mean"] for h in updates] == pytest.approx([0.1, 0.2, 0.3, (0.8 - 0.001) / 2, (1.3 - 0.001) / 2])
    assert "norm_ratio" not in updates[2] and "norm_ratio" in updates[3]
    method = GReg2(delta_lambda_pick=0.1, tau0=0.25, delta_lambda=0.5, tau=1.0, update_interval=1, stabilize_steps=2)
    assert summary["regularize/steps"] == method.planned_steps() == 4 + 2
    assert summary["regularize/end"].startswith("condition: lambda passed tau=1 at iteration 4")


def test_greg2_applies_minus_gamma_to_kept_and_lambda_to_pruned_weights():
    model = create("resnet_tiny")
    method = GReg2(delta_lambda_pick=0.1, tau0=0.05, delta_lambda=0.5, tau=1.0, update_interval=1, weight_decay=0.002)
    method._layers = {"layer1.0.conv1": ["layer1.0.conv1.weight"]}
    size = model.layer1[0].conv1.out_channels
    method.selection = {"keep": {"layer1.0.conv1": [0, 1]}, "sizes": {"layer1.0.conv1": size}}
    method.picks, method.grows = 1, 1
    lam = method._build_lambdas(model)["layer1.0.conv1.weight"].flatten()
    assert lam.tolist() == pytest.approx([-0.002, -0.002] + [0.6] * (size - 2))
    weight = model.layer1[0].conv1.weight
    expected = 0.5 * sum(lam[j].item() * weight[j].pow(2).sum().item() for j in range(size))
    assert method.extra_loss(model).item() == pytest.approx(expected, rel=1e-5)


def test_a_killed_regularisation_resumes_with_the_same_lambda_and_result(tmp_path):
    args = [*GREG1, "checkpoint_every_n_steps=1"]
    reference = _run(tmp_path / "ref", *args)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "run", *args, callbacks=[CrashAtStep(5, "regularize")])
    resumed = _run(tmp_path / "run", *args)
    assert _history(tmp_path / "run") == _history(tmp_path / "ref")
    comparable = lambda s: {k: v for k, v in s.items() if not k.startswith("time/")}  # noqa: E731
    assert comparable(resumed) == comparable(reference)


def test_flops_budget_and_unstructured_granularity(tmp_path):
    summary = _run(tmp_path / "flops", *GREG1[:6], "budget.flops=0.6", "budget.tolerance=0.05")
    exported = load_model(tmp_path / "flops" / "model.pt")
    measured = count_flops(exported, (3, 32, 32)) / count_flops(create("resnet_tiny"), (3, 32, 32))
    assert measured == pytest.approx(0.6, rel=0.05) and summary["model/flops_ratio"] == pytest.approx(measured)

    summary = _run(tmp_path / "weights", *GREG1[:6], "method.granularity=weight", "budget.sparsity=0.7")
    assert summary["model/sparsity"] == pytest.approx(0.7, abs=1e-3)
    masks = torch.load(_stage(tmp_path / "weights", "prune") / "masks.pt", weights_only=False)
    assert masks is not None
    assert max(h["norm_ratio"] for h in _history(tmp_path / "weights")) > 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method=greg1", "method.granularity=channel", "budget.flops=0.5"],
            "method.granularity='channel' is not one of",
        ),
        (["method=greg1", "method.delta_lambda=0", "budget.flops=0.5"], "method.delta_lambda=0 must be a number > 0"),
        (["method=greg2", "method.tau0=2", "budget.flops=0.5"], "method.tau0=2 must be in (0, tau=1)"),
        (
            ["method=greg1"],
            "GReg1 prunes to a budget: set budget.flops or budget.params or budget.latency or budget.layer_ratios",
        ),
        (
            ["method=greg1", "method.granularity=weight", "budget.flops=0.5"],
            "GReg1 prunes to a budget: set budget.sparsity",
        ),
    ],
)
def test_bad_greg_settings_stop_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as caught:
        _run(tmp_path, *overrides)
    assert message in str(caught.value)
    assert not (tmp_path / "stages").exists()


GREG_PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("greg1_*_table*.yaml"))


@pytest.mark.parametrize("name", GREG_PRESETS)
def test_greg_presets_follow_the_papers_settings(name):
    """Every preset composes, builds its method, and carries Table 5 / 8's settings."""
    cfg = preset(name)
    check_config(cfg)
    imagenet = "imagenet" in name
    assert cfg.retrain.mode == "finetune" and cfg.retrain.with_val is True
    assert cfg.budget.prune_coupled is False or "unstructured" in name
    if name.endswith("_l1"):
        assert cfg.method._target_.endswith("L1Filter")
        twin = preset(name[: -len("_l1")])
        # The one-shot twin prunes the same layers by the same ratios and fine-tunes the same way.
        assert twin.budget == cfg.budget and twin.retrain == cfg.retrain and twin.optimizer == cfg.optimizer
        return
    method = instantiate(cfg.method)
    assert isinstance(method, GReg1)
    assert (method.update_interval, method.stabilize_steps) == ((5, 40000) if imagenet else (10, 5000))
    assert (method.delta_lambda, method.tau, method.lr, method.momentum) == (1e-4, 1.0, 1e-3, 0.9)
    assert method.weight_decay == (1e-4 if imagenet else 5e-4)
    assert cfg.retrain.epochs == (90 if imagenet else 120) and cfg.optimizer.lr == 0.01


def test_the_official_magnitude_ratio_limit_ends_the_growth_early(tmp_path):
    args = [
        "method=greg1",
        "method.delta_lambda=1.0",
        "method.tau=100",
        "method.update_interval=1",
        "method.stabilize_steps=2",
        "method.lr=0.008",
        "method.ratio_limit=5",
        "budget.layer_ratios=[0,0.5,0.5,0.5]",
        "budget.prune_coupled=false",
    ]
    summary = _run(tmp_path, *args)
    end = summary["regularize/end"]
    assert end.startswith("condition: every layer's kept/pruned magnitude ratio reached 5 at iteration ")
    reached_at = int(end.split("at iteration ")[1].split(",")[0])
    # Far before lambda would pass tau (iteration 100), and each layer's smoothed ratio is past the limit.
    assert 0 < reached_at < 100 and summary["regularize/steps"] == reached_at + 2
    history = _history(tmp_path)
    assert history[-1]["norm_ratio"] > 2 * history[0]["norm_ratio"] and all(h["lambda"] <= 100 for h in history)
