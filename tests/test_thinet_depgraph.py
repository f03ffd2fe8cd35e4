"""ThiNet and DepGraph: ThiNet's contributions, greedy selection and least-squares refit against the paper's formulas
computed directly; DepGraph's regulariser and importance against Torch-Pruning's own GroupNormPruner; both against the
budgets, a timm model, bad settings and the command line."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch_pruning as tp
from conftest import CrashAtEpoch, EpochRecorder, make_cfg, preset, run_cli
from omegaconf import OmegaConf
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import count_flops
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext
from prunelab.methods.depgraph import DepGraph, group_norm_scores, group_penalty
from prunelab.methods.thinet import (
    ThiNet,
    collect_contributions,
    contributions_of,
    greedy_order,
    least_squares_scales,
    rank_scores,
)
from prunelab.structure import CoupledSlice, apply_channel_plan, channel_groups, coupled_slices

SHAPE = (3, 8, 8)
QUIET = ("latency.batch_sizes=[]", "quiet=true")


class Tiny(nn.Module):
    """conv1 -> bn1 starts a residual stream (conv3 adds to it), conv2 -> bn2 is a block's inner group."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        return self.fc(x.mean((2, 3)))


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.2, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return model


class _Data:
    """Training batches as `training_batches` reads them."""

    def __init__(self, batches):
        self.batches = batches

    def train_eval_dataloader(self):
        return iter(self.batches)


def _ctx(budget: dict, data=None, shape=SHAPE, dense=None) -> MethodContext:
    return MethodContext(
        budget=OmegaConf.create(budget),
        data=data,
        input_shape=shape,
        num_classes=10,
        seed=0,
        run_dir=None,
        dense=dense or {},
    )


def _batches(shape=SHAPE, count=3, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, *shape, generator=g), torch.randint(classes, (6,), generator=g)) for _ in range(count)]


# ---- ThiNet ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation", [(3, 2, 1, 1), ((3, 1), (1, 2), (2, 0), (2, 1)), (1, 1, 0, 1)]
)
def test_thinet_contributions_are_each_channels_share_of_the_next_output(kernel, stride, padding, dilation):
    """x_hat_c is the next conv's output when only channel c is fed (bias removed), at the sampled place."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, kernel, stride=stride, padding=padding, dilation=dilation, bias=True)
    x = torch.randn(3, 5, 9, 9)
    piece = CoupledSlice("1", "in", 1, torch.arange(5), torch.arange(5))
    images, outputs, places = torch.tensor([0, 2, 1, 2]), torch.tensor([3, 0, 1, 2]), torch.tensor([0, 7, 24, 13])
    assert conv(x)[0, 0].numel() > 24
    got = contributions_of(conv, x, piece, 5, images, outputs, places)
    width = conv(x).shape[-1]
    for c in range(5):
        only = torch.zeros_like(x)
        only[:, c] = x[:, c]
        y = (conv(only) - conv.bias.view(1, -1, 1, 1)).detach()
        direct = y[images, outputs, places // width, places % width]
        assert torch.allclose(got[:, c].float(), direct, atol=1e-5)
    full = (conv(x) - conv.bias.view(1, -1, 1, 1)).detach()[images, outputs, places // width, places % width]
    assert torch.allclose(got.sum(1).float(), full, atol=1e-5)


def _objective(x: torch.Tensor, removed: list[int]) -> float:
    """Eq. 5 written directly: sum over samples of the squared sum of the removed channels' contributions."""
    return float(sum(x[i, removed].sum() ** 2 for i in range(x.shape[0])))


def test_thinet_greedy_adds_the_channel_of_least_reconstruction_error_each_step():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    x[:, 2] = -x[:, 5] + 0.01 * x[:, 2]  # two channels that nearly cancel: a greedy pair, not the smallest alone
    order = greedy_order(x)
    assert sorted(order) == list(range(7))
    for step in range(7):
        chosen = order[:step]
        values = {c: _objective(x, [*chosen, c]) for c in range(7) if c not in chosen}
        assert _objective(x, [*chosen, order[step]]) == pytest.approx(min(values.values()), rel=1e-12)
    # The first pick is the brute-force optimum of a single removal.
    assert order[0] == min(range(7), key=lambda c: _objective(x, [c]))
    # Brute force over all removed pairs: the greedy's pair is no better than the optimum, here {2, 5}.
    best = min(itertools.combinations(range(7), 2), key=lambda t: _objective(x, list(t)))
    assert set(best) == {2, 5}
    assert _objective(x, order[:2]) >= _objective(x, list(best)) - 1e-12


def test_thinet_rank_scores_keep_the_same_fraction_of_every_group():
    scores = {"a": rank_scores([3, 0, 1, 2]), "b": rank_scores(list(range(8))[::-1])}
    assert scores["a"].tolist() == [0.375, 0.625, 0.875, 0.125]
    for tau in (0.3, 0.5, 0.7):
        kept = {k: float((s >= tau).float().mean()) for k, s in scores.items()}
        assert kept["a"] == kept["b"]


def test_thinet_refit_is_the_least_squares_solution_and_reconstructs_better():
    model, batches = _tiny().eval(), _batches()
    groups = [g for g in channel_groups(model, SHAPE) if not g.coupled]
    slices = coupled_slices(model, groups, SHAPE)
    x = collect_contributions(model, groups, slices, batches, 10, seed=0)["conv2"]
    assert x.shape == (3 * 6 * 10, 6)
    budget = {"layer_ratios": ["1:0.5"], "prune_coupled": False}
    before = model.conv3.weight.detach().clone()
    plan = ThiNet(batches=3, samples=10).plan(model, _ctx(budget, _Data(batches)))
    kept = plan.keep["conv2"]
    assert kept == sorted(greedy_order(x)[3:])
    expected = torch.linalg.lstsq(x[:, kept], x.sum(1, keepdim=True)).solution.flatten()
    assert torch.allclose(least_squares_scales(x, kept), expected)
    ratio = model.conv3.weight.detach()[:, kept] / before[:, kept]
    assert torch.allclose(ratio, expected.float().view(1, -1, 1, 1).expand_as(ratio), rtol=1e-4)
    removed = [c for c in range(6) if c not in kept]
    assert torch.equal(model.conv3.weight.detach()[:, removed], before[:, removed])
    # The refit's error on the samples is the least-squares minimum, below the plain removal's.
    target = x.sum(1)
    assert ((x[:, kept] @ expected - target) ** 2).sum() < ((x[:, kept].sum(1) - target) ** 2).sum()


def test_thinet_without_refit_leaves_the_weights():
    model, batches = _tiny().eval(), _batches()
    state = copy.deepcopy(model.state_dict())
    ThiNet(batches=2, refit=False).plan(model, _ctx({"layer_ratios": ["0-1:0.5"]}, _Data(batches)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_thinet_coupled_group_sums_the_terms_of_all_its_readers():
    model, batches = _tiny().eval(), _batches(count=1)
    groups = channel_groups(model, SHAPE)
    slices = coupled_slices(model, groups, SHAPE)
    readers = sorted(p.layer for p in slices["conv1"] if p.kind == "in")
    assert readers == ["conv2", "fc"]
    x = collect_contributions(model, groups, slices, batches, 4, seed=0)["conv1"]
    assert x.shape == (2 * 6 * 4, 8)  # the samples of conv2 and of fc, pooled


@pytest.mark.parametrize("method", ["thinet", "depgraph"])
def test_budgets_flops_layer_ratios_and_round_to(method):
    model = create("resnet_tiny")
    dense = {"flops": count_flops(model, (3, 32, 32))}
    data = _Data(_batches((3, 32, 32), count=2, classes=10))
    pruner = ThiNet(batches=2, samples=4, refit=False) if method == "thinet" else DepGraph(epochs=0)
    plan = pruner.plan(model, _ctx({"flops": 0.5, "tolerance": 0.01}, data, (3, 32, 32), dense))
    pruned = apply_channel_plan(copy.deepcopy(model), plan, (3, 32, 32))
    assert count_flops(pruned, (3, 32, 32)) / dense["flops"] == pytest.approx(0.5, abs=0.01)
    plan = pruner.plan(model, _ctx({"flops": 0.5, "round_to": 4, "tolerance": 0.05}, data, (3, 32, 32), dense))
    assert all(len(k) % 4 == 0 or len(k) == plan.sizes[n] for n, k in plan.keep.items())
    groups = channel_groups(model, (3, 32, 32))
    plan = pruner.plan(model, _ctx({"layer_ratios": ["0-100:0.25"]}, data, (3, 32, 32), dense))
    for g in groups:
        assert len(plan.keep[g.name]) == g.size - round(0.25 * g.size)


def test_thinet_with_a_flops_budget_keeps_one_fraction_everywhere():
    model = create("resnet_tiny")
    data = _Data(_batches((3, 32, 32), count=1, classes=10))
    plan = ThiNet(batches=1, samples=4, refit=False).plan(model, _ctx({"flops": 0.5}, data, (3, 32, 32)))
    fractions = {round(len(k) / plan.sizes[n], 6) for n, k in plan.keep.items()}
    # One threshold on ranks (step + 0.5) / size: every group keeps its fraction within one channel of the others.
    assert max(fractions) - min(fractions) <= 1 / min(plan.sizes.values()) + 1e-6


# ---- DepGraph -------------------------------------------------------------------------------------------------------


def _tp_pruner(model: nn.Module, reg: float):
    return tp.pruner.GroupNormPruner(
        model,
        torch.randn(1, *SHAPE),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=reg,
        ignored_layers=[model.fc],
    )


@pytest.mark.parametrize("alpha", [4.0, 2.0])
def test_depgraph_regulariser_equals_torch_prunings_regularize_over_steps(alpha):
    ours, ref, reg = _tiny(), _tiny(), 1e-2
    pruner = _tp_pruner(ref, reg)
    slices = coupled_slices(ours, channel_groups(ours, SHAPE), SHAPE)
    ours.train(), ref.train()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(count=3):
        opt_a.zero_grad(), opt_b.zero_grad()
        penalty = group_penalty(ours, slices, reg, 2.0**alpha)
        (nn.functional.cross_entropy(ours(x), y) + penalty).backward()
        nn.functional.cross_entropy(ref(x), y).backward()
        plain = {n: p.grad.clone() for n, p in ref.named_parameters()}
        pruner.regularize(ref, alpha=2.0**alpha)
        for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-7), name
        # The regulariser did act: the convolutions' and BatchNorm scales' gradients moved, the biases' did not.
        assert not torch.allclose(plain["conv2.weight"], ref.conv2.weight.grad)
        assert torch.equal(plain["bn2.bias"], ref.bn2.bias.grad)
        opt_a.step(), opt_b.step()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_depgraph_importance_equals_group_magnitude_importance():
    model = _tiny()
    groups = channel_groups(model, SHAPE)
    ours = group_norm_scores(model, groups, SHAPE)
    ref = _tp_pruner(copy.deepcopy(model), 1e-4)
    names = {m: n for n, m in ref.model.named_modules()}
    compared = 0
    for group in ref.DG.get_all_groups(ignored_layers=[ref.model.fc], root_module_types=[nn.Conv2d, nn.Linear]):
        # The group of ours whose channels the root writes: the same channels, in the root's order.
        root = names[group[0].dep.target.module]
        (mine,) = [g for g in groups if root in g.layers]
        assert torch.allclose(ours[mine.name], tp.importance.GroupMagnitudeImportance(p=2)(group), rtol=1e-5)
        compared += 1
    assert compared == 2


def test_depgraph_penalty_only_in_sparse_training():
    method, model = DepGraph(reg=1e-3), _tiny()
    stages = method.stages()
    assert [s.name for s in stages] == ["sparse", "prune"] and stages[0].optimizer["weight_decay"] == 0.0
    assert [s.name for s in DepGraph(epochs=0).stages()] == ["prune"]
    method.setup(model, stages[0], _ctx({"flops": 0.5}))
    assert float(method.extra_loss(model).detach()) > 0
    method.teardown(model, stages[0])
    assert method.extra_loss(model) is None


def test_depgraph_killed_in_sparse_training_resumes_to_the_same_plan(tmp_path):
    """The regulariser keeps no state beyond the weights: a sparse stage resumed from its checkpoint ends where an
    unbroken one does."""
    args = (*QUIET, "method=depgraph", "method.epochs=2", "method.reg=1e-2", "budget.flops=0.5", "retrain=none")
    reference = pipeline.run(make_cfg(tmp_path / "ref", *args), tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(make_cfg(tmp_path / "run", *args), tmp_path / "run", callbacks=[CrashAtEpoch(1, stage="sparse")])
    recorder = EpochRecorder()
    summary = pipeline.run(make_cfg(tmp_path / "run", *args), tmp_path / "run", callbacks=[recorder])
    assert recorder.stages[0] == ("sparse", 1)
    plans = [
        json.loads(next((d / "stages").glob("*-prune")).joinpath("plan.json").read_text())
        for d in (tmp_path / "ref", tmp_path / "run")
    ]
    assert plans[0] == plans[1]
    assert summary["test/loss"] == reference["test/loss"]


# ---- settings, timm, command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ThiNet(batches=0), "method.batches=0"),
        (lambda: ThiNet(samples=2.5), "method.samples=2.5"),
        (lambda: ThiNet(refit="yes"), "method.refit='yes'"),
        (lambda: DepGraph(reg=-1.0), "method.reg=-1.0"),
        (lambda: DepGraph(alpha=float("nan")), "method.alpha=nan"),
        (lambda: DepGraph(lr=0), "method.lr=0"),
        (lambda: DepGraph(epochs=-2), "method.epochs=-2"),
        (lambda: DepGraph(weight_decay=-1), "method.weight_decay=-1"),
    ],
)
def test_bad_settings_refused_in_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["thinet", "depgraph"])
def test_a_timm_model_prunes_to_the_flops_budget_as_l1_does(tmp_path, method):
    extra = ["method.batches=2", "method.samples=4"] if method == "thinet" else ["method.epochs=1"]
    cfg = make_cfg(
        tmp_path,
        *QUIET,
        "backbone=timm",
        "backbone.name=timm:resnet18",
        f"method={method}",
        *extra,
        "budget.flops=0.5",
        "budget.tolerance=0.02",
        "retrain=none",
    )
    summary = pipeline.run(cfg, tmp_path)
    exported = load_model(tmp_path / "model.pt")
    assert count_flops(exported, (3, 32, 32)) / summary["dense/flops"] == pytest.approx(0.5, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["thinet", "depgraph"])
def test_command_line_run_on_the_synthetic_setup(tmp_path, method):
    out = run_cli(
        "dataset=synthetic",
        "backbone=resnet_tiny",
        f"method={method}",
        "budget.flops=0.5",
        "trainer.max_epochs=1",
        "latency.batch_sizes=[]",
        "quiet=true",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = OmegaConf.load(tmp_path / "run" / "summary.json")
    assert summary["model/flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert ("time/sparse_s" in summary) == (method == "depgraph")


@pytest.mark.parametrize(
    "name, method, flops, acc",
    [
        ("depgraph_resnet56_cifar10", "DepGraph", 1 / 2.13, 93.77),
        ("thinet_mobilenet_v2_imagenet_greedy_table2", "ThiNet", 175 / 314, 68.6),
    ],
)
def test_presets_compose_with_the_papers_budget(name, method, flops, acc):
    cfg = preset(name)
    assert cfg.method._target_.endswith(method)
    assert cfg.budget.flops == pytest.approx(flops, abs=5e-4) and cfg.paper.flops == cfg.budget.flops
    assert cfg.paper.acc == acc and cfg.retrain.mode == "finetune"
