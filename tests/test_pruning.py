"""The pruning core end to end: budgets met as measured on the exported model, exact sparsity,
baselines, retraining modes, BN re-estimation, resume of pruning stages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CrashAtEpoch, EpochRecorder, make_cfg, shared_path
from test_structure import SHAPE, TinyDenseNet, tiny_resnext
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import (
    BudgetError,
    CostModel,
    count_flops,
    count_params,
    keep_count,
    parse_layer_ratios,
    plan_by_threshold,
    scratch_b_epochs,
    search_threshold,
    sparsity,
    unstructured_plan,
)
from prunelab.structure import apply_channel_plan, channel_groups, prunable_weights

PRUNE = ["latency.batch_sizes=[1]", "latency.repeats=2", "latency.warmup=1"]


def _stage(run_dir, name):
    """The directory of the stage called `name` (stage folders are numbered in run order)."""
    (found,) = run_dir.glob(f"stages/*-{name}")
    return found


def _run(tmp_path, *overrides, callbacks=None):
    cfg = make_cfg(tmp_path, *PRUNE, *overrides)
    return pipeline.run(cfg, tmp_path, callbacks=callbacks), cfg


@pytest.mark.parametrize("method", ["l1_filter", "uniform", "random", "slimming", "taylor"])
def test_structured_methods_meet_flops_budget_on_exported_model(tmp_path, method):
    # A uniform width moves every group at once, so on a tiny model its FLOPs steps are coarse.
    tolerance = 0.05 if method == "uniform" else 0.02
    summary, _cfg = _run(tmp_path, f"method={method}", "budget.flops=0.5", f"budget.tolerance={tolerance}")
    exported = load_model(tmp_path / "model.pt")
    measured = count_flops(exported, (3, 32, 32)) / summary["dense/flops"]
    assert measured == pytest.approx(0.5, rel=tolerance)
    assert summary["model/flops_ratio"] == pytest.approx(measured)
    assert summary["model/params"] < summary["dense/params"]
    plan = json.loads((_stage(tmp_path, "prune") / "plan.json").read_text())
    assert plan["keep"] and all(len(v) >= 1 for v in plan["keep"].values())
    # Random initialisation is not worth testing: the dense test runs only after training or loading.
    assert "dense/test/acc" not in summary
    for key in ("test/acc", "model/latency_b1_ms", "dense/latency_b1_ms", "time/prune_s"):
        assert key in summary, key


@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_taylor_score_is_the_squared_first_order_loss_change_of_removing_a_channel(arch):
    """Molchanov et al.: removing channel c changes the loss by -(sum of g * w over its gate) to first order;
    checked against a central finite difference of the loss along the channel's BatchNorm weight and bias
    shrinking to zero (float64, training mode as the scores are taken)."""
    from prunelab.methods.baselines import taylor_scores

    torch.manual_seed(0)
    model = create(arch).double()
    groups = channel_groups(model, SHAPE)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *SHAPE, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)
    state = copy.deepcopy(model.state_dict())
    scores = taylor_scores(model, groups, [(x, y)])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # BN statistics untouched
    for group in (groups[0], groups[-1]):
        assert group.norms
        for channel in (0, group.size - 1):
            # B023: `loss` is called only within this iteration of the loops.
            def loss(t: float) -> float:
                net = copy.deepcopy(model).train()
                with torch.no_grad():
                    for name in group.norms:  # noqa: B023
                        bn = net.get_submodule(name)
                        bn.weight[channel] *= 1 - t  # noqa: B023
                        bn.bias[channel] *= 1 - t  # noqa: B023
                    return float(nn.functional.cross_entropy(net(x), y))

            eps = 1e-5
            change = (loss(eps) - loss(-eps)) / (2 * eps)  # = -(sum of g * w)
            assert float(scores[group.name][channel]) == pytest.approx(change**2, rel=1e-3, abs=1e-12)
    # Scores rank channels across layers as they are (no per-layer normalisation).
    assert len({float(s.max()) for s in scores.values()}) > 1


def test_taylor_needs_a_batch(tmp_path):
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.batches=0 must be at least 1"):
        _run(tmp_path, "method=taylor", "method.batches=0", "budget.flops=0.5")
    assert not (tmp_path / "stages").exists()


def test_params_budget(tmp_path):
    summary, _ = _run(tmp_path, "method=l1_filter", "budget.params=0.4", "budget.tolerance=0.03")
    assert summary["model/params_ratio"] == pytest.approx(0.4, rel=0.03)


def test_layer_ratios_per_stage_prune_exact_fractions(tmp_path):
    model = create("resnet20")
    groups = channel_groups(model, (3, 32, 32))
    ratios = parse_layer_ratios([0, 0.75, 0.75, 0.32, 0], groups)
    assert {g.stage for g in groups} == {0, 1, 2, 3}
    assert all(ratios[g.name] == [0, 0.75, 0.75, 0.32, 0][g.stage] for g in groups)
    _summary, _ = _run(
        tmp_path,
        "backbone=resnet20",
        "method=l1_filter",
        "budget.layer_ratios=[0,0.75,0.75,0.32,0]",
        "budget.prune_coupled=false",
        "retrain=none",
    )
    pruned = load_model(tmp_path / "model.pt")
    # Inner block convolutions of stages 1-3 keep 25%, 25%, 68% of 16, 32, 64 channels.
    assert pruned.layer1[0].conv1.out_channels == 4
    assert pruned.layer2[0].conv1.out_channels == 8
    assert pruned.layer3[0].conv1.out_channels == round(64 * 0.68)
    assert pruned.conv1.out_channels == 16


def test_layer_ranges_and_bad_specs():
    groups = channel_groups(create("vgg_tiny"), (3, 32, 32))
    ratios = parse_layer_ratios(["1-2:0.5"], groups)
    assert set(ratios) == {g.name for g in groups if 1 <= g.layer_index <= 2} and set(ratios.values()) == {0.5}
    with pytest.raises(BudgetError, match="stages"):
        parse_layer_ratios([0.5, 0.5], channel_groups(create("resnet_tiny"), (3, 32, 32)))
    with pytest.raises(BudgetError, match="not 'a-b:ratio'"):
        parse_layer_ratios(["1-2"], groups)
    with pytest.raises(BudgetError, match=r"\[0, 1\)"):
        parse_layer_ratios(["0-3:1.0"], groups)


def test_round_to_and_never_zero_channels():
    assert keep_count(0, 16) == 1
    assert keep_count(9, 64, round_to=8) == 16
    assert keep_count(63, 64, round_to=8) == 64


def test_impossible_budget_says_so():
    model = create("resnet_tiny")
    scores = {g.name: torch.rand(g.size) for g in channel_groups(model, (3, 32, 32))}
    with pytest.raises(BudgetError, match="cannot be met"):
        search_threshold(model, scores, 0.001, (3, 32, 32))


def test_threshold_search_on_rounded_channels_is_measured():
    model = create("resnet20")
    groups = channel_groups(model, (3, 32, 32))
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    plan, ratio = search_threshold(model, scores, 0.5, (3, 32, 32), tolerance=0.03, round_to=4)
    assert all(k % 4 == 0 for k in plan.kept().values())
    assert ratio == pytest.approx(0.5, rel=0.03)


class FlattenHead(nn.Module):
    """A VGG-style head: the classifier reads every channel once per pixel after a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(8))
        self.classifier = nn.Sequential(nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class ChannelProduct(nn.Module):
    """A cost the cost model takes as fixed: a product over channels (as attention computes) that shrinks with them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional.avg_pool2d(torch.relu(self.conv(x)), 4).flatten(2)
        mixed = (f.transpose(1, 2) @ f).softmax(-1) @ f.transpose(1, 2)
        return self.fc(mixed.mean(1))


COST_MODELS = {
    "resnet": lambda: create("resnet_tiny"),
    "mobilenet_v2": lambda: create("mobilenet_v2_tiny"),
    "vgg_flatten": FlattenHead,
    "densenet_concat": TinyDenseNet,
    "resnext_grouped": tiny_resnext,
    # Layers on windows folded into the first dimension and a position-bias MLP on a table of coordinate pairs.
    "swin_v2_cr_windows": lambda: create(
        "timm:swinv2_cr_tiny_224", img_size=32, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,)
    ),
}


@pytest.mark.parametrize("arch", COST_MODELS)
def test_cost_model_counts_what_the_built_model_counts(arch):
    """FLOPs and parameters from the plan equal those of the pruned model, exactly, for random plans."""
    torch.manual_seed(0)
    model = COST_MODELS[arch]()
    groups = channel_groups(model, SHAPE)
    costs = CostModel(model, groups, SHAPE)
    assert costs.dense == {"flops": count_flops(model, SHAPE), "params": count_params(model)}
    units = {g.name: g.unit for g in groups}
    for tau in (0.3, 0.6, 0.9):
        plan = plan_by_threshold({g.name: torch.rand(g.size) for g in groups}, tau, 1, units)
        pruned = apply_channel_plan(copy.deepcopy(model), plan, SHAPE)
        assert costs.count(plan) == {"flops": count_flops(pruned, SHAPE), "params": count_params(pruned)}


def test_search_corrects_for_costs_outside_the_cost_model():
    """Where a cost the cost model holds fixed shrinks with the channels, the built model still meets the target."""
    torch.manual_seed(0)
    model = ChannelProduct()
    groups = channel_groups(model, SHAPE)
    scores = {g.name: torch.rand(g.size) for g in groups}
    first = CostModel(model, groups, SHAPE)
    plan, ratio = search_threshold(model, scores, 0.5, SHAPE, tolerance=0.05)
    built = count_flops(apply_channel_plan(copy.deepcopy(model), plan, SHAPE), SHAPE) / count_flops(model, SHAPE)
    assert ratio == built and abs(ratio - 0.5) <= 0.05 * 0.5
    # The cost model alone would have missed: its estimate of the plan found is off the target.
    assert abs(first.count(plan)["flops"] / first.dense["flops"] - 0.5) > 0.05 * 0.5


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_plan_exact_sparsity(scope):
    model = create("resnet_tiny")
    scores = {n: w.detach().abs() for n, w in prunable_weights(model)}
    plan = unstructured_plan(scores, 0.7, scope)
    total = sum(m.numel() for m in plan.masks.values())
    removed = sum(int((~m).sum()) for m in plan.masks.values())
    if scope == "global":
        assert removed == round(0.7 * total)
    else:
        for name, mask in plan.masks.items():
            assert abs(int((~mask).sum()) - 0.7 * mask.numel()) <= 1, name
    # Magnitude: every kept weight is at least as large as every removed one (globally).
    if scope == "global":
        kept = torch.cat([scores[n][m] for n, m in plan.masks.items()])
        dropped = torch.cat([scores[n][~m] for n, m in plan.masks.items()])
        assert kept.min() >= dropped.max()


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_unstructured_masks_survive_finetuning(tmp_path, method):
    extra = ["method.structured=false"] if method == "random" else []
    summary, _ = _run(tmp_path, f"method={method}", *extra, "budget.sparsity=0.6", "trainer.max_epochs=2")
    exported = load_model(tmp_path / "model.pt")
    weights = [w for _, w in prunable_weights(exported)]
    total = sum(w.numel() for w in weights)
    assert sparsity(exported) == pytest.approx(0.6, abs=1.0 / total + 1e-9)
    assert summary["model/sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert summary["model/flops_ratio"] == 1.0


def test_unstructured_needs_sparsity(tmp_path):
    with pytest.raises(ValueError, match=r"budget.sparsity"):
        _run(tmp_path, "method=magnitude")


def test_scratch_b_epochs_and_reinitialisation(tmp_path):
    assert scratch_b_epochs(10, 100, 50) == 20
    assert scratch_b_epochs(10, 100, 25, max_factor=2.0) == 20
    summary, _ = _run(
        tmp_path,
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.02",
        "retrain=scratch_b",
        "retrain.epochs=1",
    )
    assert summary["scratch_b/epochs"] == round(1 / summary["model/flops_ratio"])


def test_scratch_reinitialises_pruned_weights(tmp_path):
    _run(
        tmp_path, "method=l1_filter", "budget.flops=0.5", "budget.tolerance=0.02", "retrain=scratch", "retrain.epochs=0"
    )
    pruned = load_model(_stage(tmp_path, "prune") / "model.pt")
    final = load_model(tmp_path / "model.pt")
    assert final.conv1.weight.shape == pruned.conv1.weight.shape
    assert not torch.equal(final.conv1.weight, pruned.conv1.weight)


def test_rewind_restores_initial_weights_with_structure(tmp_path):
    # Dense training for an epoch, prune, rewind to initialisation (retraining for 0 epochs shows the start point).
    _run(
        tmp_path,
        "pretrain.epochs=1",
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.02",
        "retrain=rewind",
        "retrain.epochs=0",
    )
    final = load_model(tmp_path / "model.pt")
    initial = apply_channel_plan(load_model(tmp_path / "rewind.pt"), final.prunelab.plans[0], (3, 32, 32))
    trained = apply_channel_plan(
        load_model(_stage(tmp_path, "pretrain") / "model.pt"), final.prunelab.plans[0], (3, 32, 32)
    )
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, initial.state_dict()[name]), name
    assert not torch.equal(final.layer1[0].conv1.weight, trained.layer1[0].conv1.weight)


def test_rewind_to_iteration_k(tmp_path):
    _run(
        tmp_path,
        "pretrain.epochs=1",
        "method=magnitude",
        "budget.sparsity=0.5",
        "retrain=rewind",
        "retrain.rewind_iteration=2",
        "retrain.epochs=0",
        "trainer.limit_train_batches=4",
    )
    rewound = load_model(tmp_path / "rewind.pt")
    final = load_model(tmp_path / "model.pt")
    mask = final.prunelab.masks.masks["conv1.weight"]
    assert torch.equal(final.conv1.weight, rewound.conv1.weight * mask)


def test_prune_stage_resumes_and_is_not_redone(tmp_path):
    args = ["method=l1_filter", "budget.flops=0.5", "budget.tolerance=0.02", "trainer.max_epochs=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, *args, callbacks=[CrashAtEpoch(1)])
    plan_file = _stage(tmp_path, "prune") / "plan.json"
    first = plan_file.stat().st_mtime_ns
    recorder = EpochRecorder()
    summary, _ = _run(tmp_path, *args, callbacks=[recorder])
    assert plan_file.stat().st_mtime_ns == first
    assert recorder.epochs == [1]
    assert summary["model/flops_ratio"] == pytest.approx(0.5, rel=0.02)


def test_bn_recalibration_restores_accuracy_of_pretrained_resnet20(tmp_path):
    root = shared_path("data", "cifar-10-subset")
    weights = shared_path("weights", "cifar10", "resnet20-12fca82f.th")
    common = [
        "dataset=cifar10",
        f"dataset.root={root}",
        "dataset.val_size=500",
        "dataset.num_workers=0",
        "backbone=resnet20",
        f"backbone.pretrained={weights}",
        "method=magnitude",
        "budget.sparsity=0.8",
        "retrain=none",
    ]
    plain, _ = _run(tmp_path / "plain", *common)
    recal, _ = _run(tmp_path / "recal", *common, "bn_recalibration.batches=-1")
    assert plain["dense/test/acc"] == pytest.approx(91.6, abs=0.5)
    # Measured here: 40.5% after 80% global magnitude pruning, 80.0% after re-estimating BN statistics.
    assert 30.0 < plain["test/acc"] < 50.0
    assert recal["test/acc"] > plain["test/acc"] + 25.0
    assert recal["model/sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_slimming_penalty_shrinks_bn_scales(tmp_path):
    def gamma_l1(run_dir):
        model = load_model(_stage(run_dir, "sparsity") / "model.pt")
        return sum(float(m.weight.abs().sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    args = ["method=slimming", "budget.flops=0.5", "budget.tolerance=0.02", "retrain=none", "trainer.max_epochs=2"]
    _run(tmp_path / "off", *args, "method.penalty=0")
    _run(tmp_path / "on", *args, "method.penalty=0.1")
    assert gamma_l1(tmp_path / "on") < 0.9 * gamma_l1(tmp_path / "off")


def test_timm_backbone_prunes_end_to_end(tmp_path):
    summary, _ = _run(
        tmp_path,
        "backbone=timm",
        "backbone.name=timm:resnet18",
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.02",
        "retrain=none",
    )
    exported = load_model(tmp_path / "model.pt")
    assert count_flops(exported, (3, 32, 32)) / summary["dense/flops"] == pytest.approx(0.5, rel=0.02)
    deployed = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(deployed(x), exported.eval()(x), atol=1e-5)


def test_retrain_schedule_from_config(tmp_path):
    from prunelab.methods.baselines import L1Filter
    from prunelab.pipeline import plan_stages

    cfg = make_cfg(
        tmp_path,
        "pretrain.epochs=2",
        "pretrain.lr=0.3",
        "retrain=scratch",
        "retrain.epochs=3",
        "retrain.optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 0.001}",
        "scheduler=multistep",
    )
    stages = plan_stages(cfg, L1Filter())
    assert [s.name for s in stages] == ["pretrain", "dense", "prune", "scratch", "test"]
    assert (stages[0].epochs, stages[0].lr) == (2, 0.3)
    assert stages[3].epochs == 3 and stages[3].optimizer._target_ == "torch.optim.Adam"
    cfg = make_cfg(tmp_path, "retrain=none", "bn_recalibration.batches=5", "test=false")
    assert [s.name for s in plan_stages(cfg, L1Filter())] == ["prune", "prune_bn"]


def test_count_flops_gives_every_submodule_its_own_mode_back():
    model = create("resnet_tiny").train()
    model.bn1.eval()
    count_flops(model, (3, 32, 32))
    assert model.training and model.layer1[0].bn1.training and not model.bn1.training


def test_the_model_right_after_pruning_can_be_tested(tmp_path):
    from prunelab.methods.baselines import L1Filter
    from prunelab.pipeline import plan_stages

    cfg = make_cfg(tmp_path, "method=l1_filter", "budget.flops=0.5", "bn_recalibration.batches=1", "test_pruned=true")
    assert [s.name for s in plan_stages(cfg, L1Filter())] == ["prune", "prune_bn", "pruned", "finetune", "test"]
    summary, _ = _run(
        tmp_path,
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.05",
        "test_pruned=true",
        "pretrain.epochs=1",
    )
    # Pruning half the FLOPs of a freshly trained toy model costs accuracy that fine-tuning then changes.
    assert summary["pruned/test/acc"] != summary["test/acc"]
    assert "pruned/test/acc" in summary and "dense/test/acc" in summary


def test_retraining_with_validation_images(tmp_path):
    summary, _ = _run(
        tmp_path,
        "method=l1_filter",
        "budget.flops=0.5",
        "budget.tolerance=0.05",
        "retrain.with_val=true",
        "trainer.log_every_n_steps=1",
        "pretrain.epochs=1",
    )
    # 224 training + 32 validation images at batch 32: 8 steps instead of 7 in the retraining epoch.
    assert summary["pretrain/steps"] == 7 and summary["finetune/steps"] == 8
    # The retraining stage validates on the test set, so the objective sweepers see is pre-training's.
    assert summary["finetune/val/acc"] == summary["test/acc"]
    assert summary["val/acc"] == summary["pretrain/val/acc"]


@pytest.mark.parametrize("seed", [2, 5, 10])
def test_budget_no_threshold_lands_on_is_completed_channel_by_channel(seed):
    """Where every global threshold jumps past the band, the closest plan under budget is completed in score order.

    With these scores the bisection alone ends 'closest under budget' at 0.47-0.49 of the FLOPs, outside
    0.5 +- 0.5% (the failure of `experiment=pfs_resnet20_digits_quick`: a channel of a full-resolution layer costs more
    than the band is wide).
    """
    model = create("resnet20", width=0.5)
    groups = channel_groups(model, (3, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.size, generator=generator) for g in groups}
    costs = CostModel(model, groups, (3, 32, 32))
    top = max(float(s.max()) for s in scores.values())
    normalised = {n: s / top for n, s in scores.items()}
    ratios = [
        costs.count(plan_by_threshold(normalised, tau))["flops"] / costs.dense["flops"]
        for tau in torch.linspace(0, 1, 2001).tolist()
    ]
    assert not any(abs(r - 0.5) <= 0.005 * 0.5 for r in ratios)
    plan, ratio = search_threshold(model, scores, 0.5, (3, 32, 32), tolerance=0.005)
    assert abs(ratio - 0.5) <= 0.005 * 0.5
    assert ratio == count_flops(apply_channel_plan(copy.deepcopy(model), plan, (3, 32, 32)), (3, 32, 32)) / count_flops(
        model, (3, 32, 32)
    )
    # Each group keeps its best-scored channels, and every channel above the closest threshold under budget.
    under = max((r, tau) for r, tau in zip(ratios, torch.linspace(0, 1, 2001).tolist()) if r <= 0.5)[1]
    for name, kept in plan.keep.items():
        order = torch.argsort(scores[name], descending=True)[: len(kept)]
        assert sorted(order.tolist()) == kept
        assert set(torch.nonzero(normalised[name] >= under).flatten().tolist()) <= set(kept)


def test_budget_no_plan_meets_names_the_closest():
    model = create("resnet20", width=0.5)
    scores = {
        g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(2))
        for g in channel_groups(model, (3, 32, 32))
    }
    with pytest.raises(
        BudgetError, match=r"no plan brings the flops ratio within 0\.00% of 0\.5 \(closest under budget: 0\.4"
    ):
        search_threshold(model, scores, 0.5, (3, 32, 32), tolerance=1e-9)


class ClassToken(nn.Module):
    """A learned token expanded over the batch and handed to a layer as its input (timm's PiT and CaiT)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.stem, self.token = nn.Conv2d(in_channels, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.token.expand(x.shape[0], -1)) + self.stem(x).mean((1, 2, 3))[:, None]


def test_flops_are_counted_where_a_parameter_view_is_a_layer_input():
    """Under no_grad a view of a parameter still requires gradients, without an autograd node: FlopCounterMode's module
    tracker failed on it ("Expected gradient function to be set"). Counting leaves every flag as it was."""
    model = ClassToken()
    model.stem.weight.requires_grad_(False)
    assert count_flops(model, SHAPE) == 8 * 3 * 9 * 32 * 32 + 8 * 10
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        "token": True,
        "stem.weight": False,
        "stem.bias": True,
        "head.weight": True,
        "head.bias": True,
    }
