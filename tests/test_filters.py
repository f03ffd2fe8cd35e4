"""The filter-criterion baselines FPGM, SFP and HRank: scores against their papers' formulas computed directly,
SFP's soft zeroing and its resume, budgets met as structured_plan meets them (beside L1), and the command line."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from conftest import FAST, CrashAtEpoch, make_cfg, preset, randomize_bn, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import prunelab
from prunelab import pipeline
from prunelab.backbones import create
from prunelab.budget import count_flops, keep_count, measure, structured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, Stage, prunable_groups
from prunelab.methods.baselines import L1Filter, Taylor, allocate, l1_scores
from prunelab.methods.fpgm import FPGM, fpgm_scores
from prunelab.methods.hrank import HRank, hrank_scores
from prunelab.methods.sfp import SoftFilterPruning, filter_norms
from prunelab.structure import apply_channel_plan, channel_groups

SHAPE = (3, 32, 32)


class Batches:
    """A datamodule stand-in: fixed training batches, as `training_batches` reads them."""

    def __init__(self, shape=SHAPE, count: int = 2, size: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(size, *shape, generator=gen), torch.randint(0, 10, (size,))) for _ in range(count)]

    def train_eval_dataloader(self):
        return iter(self.batches)


def _ctx(tmp_path, model, shape=SHAPE, data=None, **budget) -> MethodContext:
    return MethodContext(
        budget=OmegaConf.create({"tolerance": 0.02, "iterations": 30, "round_to": 1, **budget}),
        data=data,
        input_shape=shape,
        num_classes=10,
        seed=0,
        run_dir=tmp_path,
        dense=measure(model, shape),
    )


def _counts(plan) -> dict[str, int]:
    return {name: len(kept) for name, kept in plan.keep.items()}


def _soft_plan(method: SoftFilterPruning, model: nn.Module, ctx: MethodContext):
    """SFP's plan after one soft epoch without training: the zeroing at its end, then the prune."""
    method.setup(model, Stage("soft", "fit"), ctx)
    method.on_train_epoch_start(model, 0, 1)
    method.on_train_epoch_end(model, 0)
    return method.plan(model, ctx)


def _plan(name: str, model: nn.Module, ctx: MethodContext, **options):
    if name == "sfp":
        return _soft_plan(SoftFilterPruning(**options), model, ctx)
    return {"fpgm": FPGM, "hrank": HRank}[name](**options).plan(model, ctx)


# ---- FPGM ------------------------------------------------------------------------------------------------------


def test_fpgm_score_is_the_summed_distance_to_the_other_filters_of_the_group():
    torch.manual_seed(0)
    model = create("resnet_tiny")
    groups = channel_groups(model, SHAPE)
    scores = fpgm_scores(model, groups)
    coupled = [g for g in groups if len(g.layers) > 1]
    assert coupled  # the residual stream: two layers write its channels
    for group in groups:
        weights = [model.get_submodule(name).weight.detach().double().flatten(1) for name in group.layers]
        expected = torch.tensor(
            [
                sum(
                    sum(((w[i] - w[j]) ** 2).sum() for w in weights) ** 0.5  # one filter: all its layers' rows
                    for j in range(group.size)
                )
                for i in range(group.size)
            ]
        )
        assert torch.allclose(scores[group.name].double(), expected, rtol=1e-5), group.name
    l1 = fpgm_scores(model, groups, "l1")[groups[1].name]
    w = model.get_submodule(groups[1].layers[0]).weight.detach().double().flatten(1)
    assert torch.allclose(l1.double(), (w[:, None] - w[None]).abs().sum(-1).sum(1), rtol=1e-5)


class Points(nn.Module):
    """One 1x1 convolution whose six filters are points of the plane, read by a classifier."""

    def __init__(self, points: list[tuple[float, float]]):
        super().__init__()
        self.conv = nn.Conv2d(2, len(points), 1, bias=False)
        self.bn = nn.BatchNorm2d(len(points))
        self.fc = nn.Linear(len(points), 10)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(points).view(len(points), 2, 1, 1))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_fpgm_removes_the_filter_nearest_the_geometric_median_where_l1_removes_the_smallest(tmp_path):
    # A cluster around (10, 0) and one small filter far from it: the cluster's centre is the redundant one.
    model = Points([(0.0, 0.0), (9.0, 0.0), (10.0, 1.0), (10.0, 0.0), (11.0, 0.0), (10.0, -1.0)])
    shape = (2, 8, 8)
    ctx = _ctx(tmp_path, model, shape, layer_ratios=["0:0.17"])
    assert FPGM().plan(model, ctx).keep["conv"] == [0, 1, 2, 4, 5]
    assert L1Filter().plan(model, ctx).keep["conv"] == [1, 2, 3, 4, 5]


# ---- HRank -----------------------------------------------------------------------------------------------------


def test_hrank_score_is_the_mean_rank_of_each_channels_relu_map():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    )
    randomize_bn(model)
    # Rank-deficient maps too: a constant input channel and a bias that the ReLU clips.
    batches = Batches(count=3, size=5).batches
    batches[0][0][:, :, :, 4:] = 0
    groups = channel_groups(model, SHAPE)
    (group,) = groups
    model.train()
    statistics = model[1].running_mean.clone()
    scores = hrank_scores(model, groups, batches)
    # Ranked in eval mode; the model gets its mode back and its statistics stay as they were.
    assert model.training and torch.equal(model[1].running_mean, statistics)
    model.eval()
    with torch.no_grad():
        maps = torch.cat([torch.relu(model[1](model[0](x))) for x, _ in batches])
    expected = torch.tensor(
        [sum(int(torch.linalg.matrix_rank(maps[n, c])) for n in range(maps.shape[0])) / maps.shape[0] for c in range(6)]
    )
    assert torch.allclose(scores[group.name], expected)
    assert scores[group.name].min() < 32  # the zeroed columns lower some ranks: the test is not all-full-rank


def test_a_rank_one_channel_scores_lowest_and_goes_first(tmp_path):
    model = Points([(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
    shape = (2, 8, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 8, 8, generator=gen) + 0.1
    # Input channel 0 is an outer product u v^T with positive u, v: rank 1 before and after the ReLU.
    x[:, 0] = torch.rand(4, 8, 1, generator=gen) * torch.rand(4, 1, 8, generator=gen) + 0.0
    data = Batches()
    data.batches = [(x, torch.zeros(4, dtype=torch.long))]
    model.eval()
    scores = hrank_scores(model, channel_groups(model, shape), data.batches)["conv"]
    assert scores.tolist() == [1.0, 8.0, 8.0]
    ctx = _ctx(tmp_path, model, shape, data=data, layer_ratios=["0:0.34"])
    assert HRank(batches=1).plan(model, ctx).keep["conv"] == [1, 2]


# ---- SFP -------------------------------------------------------------------------------------------------------

SFP = [
    *FAST,
    "method=sfp",
    "trainer.max_epochs=3",
    "budget.flops=0.5",
    "retrain=none",
    "test=false",
    "latency.batch_sizes=[]",
]


class Watch(L.Callback):
    """Filter norms before each zeroing (the callbacks' epoch end runs before the module's) and the sets zeroed."""

    def __init__(self):
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.zeroed: list[dict] = []

    def _zeroed(self, pl_module):
        self.zeroed.append(copy.deepcopy(pl_module.method.zeroed))
        self.after.append(filter_norms(pl_module.model, pl_module.method._groups))

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.stage == "soft":
            self.before.append(filter_norms(pl_module.model, pl_module.method._groups))

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.stage == "soft" and trainer.current_epoch > 0:
            self._zeroed(pl_module)

    def on_train_end(self, trainer, pl_module):
        if pl_module.stage == "soft":
            self._zeroed(pl_module)


def _stage(run_dir, name):
    (found,) = run_dir.glob(f"stages/*-{name}")
    return found


def test_sfp_zeroes_the_lowest_norms_each_epoch_lets_them_recover_and_prunes_the_last_set(tmp_path):
    watch = Watch()
    pipeline.run(make_cfg(tmp_path, *SFP), tmp_path, callbacks=[watch])
    assert len(watch.before) == len(watch.zeroed) == 3
    sizes = {name: len(s) for name, s in watch.before[0].items()}
    for epoch, (before, zeroed, after) in enumerate(zip(watch.before, watch.zeroed, watch.after)):
        for name, norms in before.items():
            lowest = sorted(torch.argsort(norms, stable=True)[: len(zeroed[name])].tolist())
            assert zeroed[name] == lowest, (epoch, name)
            kept = [i for i in range(sizes[name]) if i not in zeroed[name]]
            assert (after[name][zeroed[name]] == 0).all() and (after[name][kept] > 0).all()
            if epoch + 1 < len(watch.before):
                # Zeroed filters train on in the next epoch.
                assert (watch.before[epoch + 1][name][zeroed[name]] > 0).all()
    assert sum(len(z) for z in watch.zeroed[0].values()) > 0
    plan = json.loads((_stage(tmp_path, "prune") / "plan.json").read_text())
    for name, zeroed in watch.zeroed[-1].items():
        assert plan["keep"][name] == [i for i in range(sizes[name]) if i not in zeroed]


def test_sfp_resumed_mid_fit_zeroes_and_prunes_as_an_unbroken_run(tmp_path):
    reference = pipeline.run(make_cfg(tmp_path / "ref", *SFP), tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(make_cfg(tmp_path / "run", *SFP), tmp_path / "run", callbacks=[CrashAtEpoch(2, "soft")])
    resumed = pipeline.run(make_cfg(tmp_path / "run", *SFP), tmp_path / "run")
    for name in ("soft", "prune"):
        ref, run = _stage(tmp_path / "ref", name), _stage(tmp_path / "run", name)
        assert torch.load(run / "method.pt", weights_only=True) == torch.load(ref / "method.pt", weights_only=True)
    assert (_stage(tmp_path / "run", "prune") / "plan.json").read_text() == (
        _stage(tmp_path / "ref", "prune") / "plan.json"
    ).read_text()
    comparable = lambda s: {k: v for k, v in s.items() if not k.startswith("time/")}  # noqa: E731
    assert comparable(resumed) == comparable(reference)


# ---- budgets, any model, settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fpgm", "sfp", "hrank"])
@pytest.mark.parametrize("round_to", [1, 4])
def test_flops_budget_and_layer_ratios_are_met_as_structured_plan_meets_them(tmp_path, name, round_to):
    torch.manual_seed(0)
    model = create("resnet_tiny")
    randomize_bn(model)
    data = Batches()
    # A FLOPs budget: the uniform allocation gives every criterion the counts of one uniform rate.
    ctx = _ctx(tmp_path, model, data=data, flops=0.5, round_to=round_to)
    plan = _plan(name, copy.deepcopy(model), ctx)
    l1 = structured_plan(model, allocate(l1_scores(model, prunable_groups(model, ctx)), "uniform"), ctx)
    assert _counts(plan) == _counts(l1)
    pruned = apply_channel_plan(copy.deepcopy(model), plan, SHAPE)
    assert count_flops(pruned, SHAPE) / ctx.dense["flops"] == pytest.approx(0.5, rel=0.02)
    assert all(n % round_to == 0 or n == plan.sizes[g] for g, n in _counts(plan).items())
    # Layer ratios: exactly L1Filter's counts per group.
    ratios = [0.0, 0.5, 0.25, 0.75, 0.0]
    ctx = _ctx(tmp_path, model, data=data, layer_ratios=ratios, round_to=round_to)
    plan = _plan(name, copy.deepcopy(model), ctx)
    assert _counts(plan) == _counts(L1Filter().plan(model, ctx))
    groups = channel_groups(model, SHAPE)
    assert _counts(plan) == {
        g.name: keep_count(round(g.size * (1 - ratios[g.stage])), g.size, round_to) for g in groups
    }


@pytest.mark.parametrize("name", ["fpgm", "sfp", "hrank"])
def test_a_timm_model_prunes_to_the_budget_as_l1_does(tmp_path, name):
    torch.manual_seed(0)
    model = create("timm:resnet18", num_classes=10).eval()
    ctx = _ctx(tmp_path, model, data=Batches(count=1, size=2), flops=0.5)
    l1 = L1Filter().plan(model, ctx)
    plan = _plan(name, copy.deepcopy(model), ctx, allocation="global")
    assert set(plan.keep) == set(l1.keep)  # the same groups are prunable
    pruned = apply_channel_plan(copy.deepcopy(model), plan, SHAPE)
    assert count_flops(pruned, SHAPE) / ctx.dense["flops"] == pytest.approx(0.5, rel=0.02)
    assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize(
    "method, options, message",
    [
        (FPGM, {"distance": "cosine"}, "fpgm: method.distance='cosine'"),
        (FPGM, {"allocation": "layer"}, "fpgm: method.allocation='layer'"),
        (HRank, {"batches": 0}, "hrank: method.batches=0"),
        (HRank, {"allocation": "x"}, "hrank: method.allocation='x'"),
        (SoftFilterPruning, {"interval": 0}, "sfp: method.interval=0"),
        (SoftFilterPruning, {"epochs": 0}, "sfp: method.epochs=0"),
        (SoftFilterPruning, {"lr": -1.0}, "sfp: method.lr=-1.0"),
    ],
)
def test_bad_settings_are_refused_in_one_line(method, options, message):
    with pytest.raises(ConfigError) as err:
        method(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_setting_stops_the_command_before_training(tmp_path):
    out = run_cli(*FAST, "method=sfp", "method.interval=0", "budget.flops=0.5", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "sfp: method.interval=0" in lines[0]
    assert not list((tmp_path / "outputs").rglob("checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fpgm", "sfp", "hrank"])
def test_each_method_runs_from_the_command_line(tmp_path, name):
    out = run_cli(
        *FAST,
        f"method={name}",
        "budget.flops=0.5",
        "latency.batch_sizes=[]",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model/flops_ratio"] == pytest.approx(0.5, rel=0.02)
    assert "test/acc" in summary and f"time/{'soft' if name == 'sfp' else 'prune'}_s" in summary


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("fpgm_resnet56_cifar10_concave_table2", "params", 0.494),
        ("sfp_resnet56_cifar10_concave_table2", "params", 0.494),
        ("sfp_resnet56_cifar10_greg_table2", "flops", 0.474),
        ("hrank_resnet56_cifar10_concave_table2", "params", 0.576),
        ("hrank_resnet56_cifar10_concave_table2_params0p32", "params", 0.319),
    ],
)
def test_presets_compose_with_the_papers_budget(name, key, value):
    cfg = preset(name)
    method = instantiate(cfg.method)
    assert type(method) is {"fpgm": FPGM, "sfp": SoftFilterPruning, "hrank": HRank}[name.split("_")[0]]
    assert cfg.budget[key] == value and cfg.paper[key] == value and cfg.paper.acc > 90
    assert cfg.dataset._target_.endswith("CIFAR10DataModule") and method.allocation == "uniform"


# The ImageNet comparison rows: Growing Regularization's Table 3 gives speed-ups (FLOPs kept = 1 / speed-up), greedy
# imitation's Table 2 the pruned FLOPs of a 3.68G ResNet-34.
@pytest.mark.parametrize(
    "name, backbone, flops, acc, epochs",
    [
        ("sfp_resnet50_imagenet_greg_table3", "resnet50", 1 / 1.72, 74.61, 90),
        ("hrank_resnet50_imagenet_greg_table3", "resnet50", 1 / 1.78, 74.98, 90),
        ("taylor_resnet50_imagenet_greg_table3_1p82x", "resnet50", 1 / 1.82, 74.50, 90),
        ("taylor_resnet50_imagenet_greg_table3_3p05x", "resnet50", 1 / 3.05, 71.69, 90),
        ("taylor_resnet34_imagenet_greg_table3", "resnet34", 1 / 1.29, 72.83, 90),
        ("l1_filter_resnet34_imagenet_greg_table3", "resnet34", 1 / 1.32, 72.17, 90),
        ("l1_filter_resnet34_imagenet_greedy_table2", "resnet34", 2.79 / 3.68, 72.1, 150),
        ("taylor_resnet34_imagenet_greedy_table2", "resnet34", 2.83 / 3.68, 72.8, 150),
        ("sfp_resnet34_imagenet_greedy_table2", "resnet34", 2.17 / 3.68, 71.8, 150),
        ("fpgm_resnet34_imagenet_greedy_table2", "resnet34", 2.16 / 3.68, 72.5, 150),
    ],
)
def test_imagenet_comparison_presets_carry_the_papers_row(name, backbone, flops, acc, epochs):
    cfg = preset(name)
    method = instantiate(cfg.method)
    kind = {"fpgm": FPGM, "sfp": SoftFilterPruning, "hrank": HRank, "taylor": Taylor, "l1": L1Filter}
    assert type(method) is kind[name.split("_")[0]] and cfg.backbone.name == backbone
    assert cfg.dataset._target_.endswith("ImageNetDataModule") and not cfg.budget.prune_coupled
    assert cfg.paper.acc == acc and cfg.paper.flops == pytest.approx(flops, abs=5e-4)
    if cfg.budget.layer_ratios is None:
        assert cfg.budget.flops == cfg.paper.flops
    else:  # Li et al.'s pruned-B layers and ratios, as GReg-1's row prunes them.
        assert cfg.budget.flops is None
        assert cfg.budget.layer_ratios == preset("greg1_resnet34_imagenet_table3").budget.layer_ratios
    # The seed paper's own fine-tuning length; for SFP (nothing after it) the soft-pruning stage's.
    if isinstance(method, SoftFilterPruning):
        assert method.epochs == epochs and cfg.retrain.mode == "none"
    else:
        assert cfg.retrain.epochs == epochs and cfg.retrain.mode == "finetune"


# Every structured baseline on a torchvision classifier that L1 prunes (MobileNetV3: squeeze-excitation, hardswish,
# depthwise convolutions), with budget.round_to=8: every group keeps a multiple of 8 channels or all of them.
STRUCTURED = {
    "l1_filter": [],
    "fpgm": [],
    "sfp": ["method.epochs=1"],
    "hrank": ["method.batches=1"],
    "thinet": ["method.batches=1", "method.samples=4", "method.refit=false"],
    "depgraph": ["method.epochs=1"],
}


@pytest.mark.parametrize("method", [m for m in STRUCTURED if m != "l1_filter"])
def test_a_torchvision_classifier_prunes_with_round_to_as_l1_does(tmp_path, method):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    results = {}
    for name in ("l1_filter", method):
        model = create("torchvision:mobilenet_v3_small", num_classes=10).eval()
        results[name] = prunelab.prune(
            model,
            name,
            {"flops": 0.6, "round_to": 8, "tolerance": 0.05},
            x[:2],
            train=train,
            overrides=["retrain=none", "latency.batch_sizes=[]", "trainer.max_epochs=1", *STRUCTURED[name]],
            run_dir=tmp_path / name,
        )
    result, l1 = results[method], results["l1_filter"]
    # The same groups are prunable; HRank keeps the classifier's hidden Linear whole (its features have no 2-D map).
    assert set(l1.plan.keep) - set(result.plan.keep) == ({"classifier.0"} if method == "hrank" else set())
    assert set(result.plan.keep) <= set(l1.plan.keep)
    kept = {g: len(k) for g, k in result.plan.keep.items()}
    assert any(n < result.plan.sizes[g] for g, n in kept.items())
    assert all(n % 8 == 0 or n == result.plan.sizes[g] for g, n in kept.items())
    assert result.report["model/flops_ratio"] == pytest.approx(0.6, abs=0.05 * 0.6)
    assert result.model(x[:2]).shape == (2, 10)
