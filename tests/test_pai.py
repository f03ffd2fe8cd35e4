"""Pruning at initialisation and LAMP: method=snip, grasp, synflow, lamp (and their shared saliency scores).

Numbers checked: SNIP's |g * w| against a gradient taken directly; GraSP's Hessian-gradient product against
finite differences of the gradient along g, and its plan removing the largest -w * Hg; SynFlow's conservation
of synaptic saliency (incoming = outgoing at every hidden neuron, every layer's total = R); LAMP's scores
against Torch-Pruning's LAMP normalisation and a direct computation, and its global selection; every
method's masks meeting budget.sparsity exactly; bad settings refused before any work; one short run each.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from conftest import make_cfg, preset, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import sparsity, unstructured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, class_balanced_batches
from prunelab.methods.grasp import GraSP
from prunelab.methods.lamp import LAMP
from prunelab.methods.saliency import grasp_scores, hessian_gradient, lamp_scores, snip_scores, synflow_scores
from prunelab.methods.snip import SNIP
from prunelab.methods.synflow import SynFlow, sparsity_schedule
from prunelab.structure import prunable_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(bias: bool = True, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)
    ).to(dtype)


def _batches(count: int = 2, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen)) for _ in range(count)
    ]


def _loss(net: nn.Module, params: dict[str, torch.Tensor], batches, temperature: float = 1.0) -> torch.Tensor:
    """The summed batch losses with the named weights replaced by `params` (a plain functional evaluation)."""
    return sum(
        nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)) / temperature, y) for x, y in batches
    )


def test_snip_scores_are_abs_gradient_times_weight_and_leave_the_model_alone():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    batches = _batches()
    names = [n for n, _ in prunable_weights(net)]
    before = copy.deepcopy(net.state_dict())
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    scores = snip_scores(net, names, batches)
    # Directly: g = d(sum of the batch losses)/dw on a copy in training mode, then |g * w|.
    reference = copy.deepcopy(net).train()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in reference.named_parameters() if n in names}
    grads = torch.autograd.grad(_loss(reference, params, batches), list(params.values()))
    for (name, w), g in zip(params.items(), grads):
        assert torch.allclose(scores[name], (g * w).abs(), rtol=1e-5, atol=1e-8)
    # Neither the weights, nor the BN running statistics, nor the requires_grad flags moved.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


def test_grasp_hessian_gradient_matches_finite_differences_of_the_gradient_along_g():
    net = _mlp(dtype=torch.float64)
    batches = _batches(dtype=torch.float64)
    names = [n for n, _ in prunable_weights(net)]
    g, hg = hessian_gradient(net, names, batches, temperature=200.0)
    weights = {n: p.detach() for n, p in net.named_parameters() if n in names}

    def gradient(shift: float) -> list[torch.Tensor]:
        params = {n: (weights[n] + shift * g[n]).requires_grad_(True) for n in names}
        return torch.autograd.grad(_loss(net, params, batches, 200.0), list(params.values()))

    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    eps = 1e-4 / float(norm)
    plus, minus = gradient(eps), gradient(-eps)
    for name, a, b in zip(names, plus, minus):
        finite = (a - b) / (2 * eps)
        assert torch.allclose(hg[name], finite, rtol=1e-5, atol=1e-9 * float(finite.abs().max())), name
    assert float(sum(h.abs().sum() for h in hg.values())) > 0
    # The score is -w * Hg.
    scores = grasp_scores(net, names, batches, 200.0)
    assert all(torch.allclose(scores[n], -weights[n] * hg[n]) for n in names)


def _ctx(tmp_path: Path, target: float, scope: str = "global", data=None, input_shape=(3, 32, 32)) -> MethodContext:
    budget = OmegaConf.create({"sparsity": target, "scope": scope})
    return MethodContext(budget, data, input_shape, 10, 0, tmp_path)


def _data(classes: int = 10, per_batch: int = 40, batches: int = 3):
    """A stand-in datamodule: fixed training batches of 32x32 images whose labels cycle through the classes."""
    gen = torch.Generator().manual_seed(2)
    found = [
        (torch.randn(per_batch, 3, 32, 32, generator=gen), torch.arange(per_batch) % classes) for _ in range(batches)
    ]
    return SimpleNamespace(train_eval_dataloader=lambda: found)


def test_grasp_plan_removes_the_largest_scores_on_class_balanced_half_batches(tmp_path):
    data = _data()
    batches = class_balanced_batches(data, 10, 3, 2)
    # Two samples of 3 images per class, ordered by class, each cut into halves (the official sampler).
    assert [len(y) for _, y in batches] == [15, 15, 15, 15]
    assert batches[0][1].tolist() == [c for c in range(10) for _ in range(3)][:15]
    model = create("resnet_tiny", num_classes=10)
    method = GraSP(samples_per_class=3, iterations=2)
    plan = method.plan(model, _ctx(tmp_path, 0.6, data=data))
    scores = grasp_scores(model, list(plan.masks), batches)
    kept = torch.cat([scores[n][m] for n, m in plan.masks.items()])
    removed = torch.cat([scores[n][~m] for n, m in plan.masks.items()])
    assert removed.min() >= kept.max()


def test_synflow_conserves_synaptic_saliency():
    # A bias-free ReLU network: linearised (|W|, input ones) it is linear, and Tanaka et al.'s theorems hold.
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)
    )
    names = [n for n, _ in prunable_weights(net)]
    scores = synflow_scores(net, names, (4,))
    w1, w2, w3 = (net[i].weight.detach().double().abs() for i in (0, 2, 4))
    r = float((torch.ones(1, 4, dtype=torch.float64) @ w1.T @ w2.T @ w3.T).sum())
    s1, s2, s3 = (scores[n] for n in names)
    # Every layer's scores sum to R.
    for s in (s1, s2, s3):
        assert float(s.sum()) == pytest.approx(r, rel=1e-12)
    # At every hidden neuron, the scores of the incoming weights sum to those of the outgoing ones.
    assert torch.allclose(s1.sum(1), s2.sum(0), rtol=1e-12)
    assert torch.allclose(s2.sum(1), s3.sum(0), rtol=1e-12)
    # Masks zero the pruned weights' scores (and leave the model as it was).
    mask = torch.rand(w2.shape) > 0.5
    masked = synflow_scores(net, names, (4,), {names[1]: mask})
    assert torch.all(masked[names[1]][~mask] == 0) and float(masked[names[0]].sum()) < r
    assert net[2].weight.requires_grad and not torch.all(net[2].weight > 0)


def test_synflow_schedule_and_iterations(tmp_path):
    steps = sparsity_schedule(0.9, 4)
    assert steps[-1] == 0.9
    assert [1 - s for s in steps[:-1]] == pytest.approx([0.1 ** (k / 4) for k in (1, 2, 3)])
    assert sparsity_schedule(0.8, 4, "linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
    model = create("resnet_tiny", num_classes=10)
    names = [n for n, _ in prunable_weights(model)]
    # One round is one top-k of the scores of the whole network.
    one = SynFlow(iterations=1).plan(model, _ctx(tmp_path, 0.9))
    scores = synflow_scores(model, names, (3, 32, 32))
    kept = torch.cat([scores[n][m] for n, m in one.masks.items()])
    removed = torch.cat([scores[n][~m] for n, m in one.masks.items()])
    assert kept.min() >= removed.max()
    # Iterating changes the mask (the scores are recomputed on the pruned network), and still hits the target.
    many = SynFlow(iterations=20).plan(model, _ctx(tmp_path, 0.9))
    assert any(not torch.equal(one.masks[n], many.masks[n]) for n in names)
    total = sum(m.numel() for m in many.masks.values())
    assert sum(int((~m).sum()) for m in many.masks.values()) == round(0.9 * total)
    dense = SynFlow(iterations=3, dense_classifier=True).plan(model, _ctx(tmp_path, 0.9))
    assert list(dense.masks) == names[:-1]


def test_lamp_scores_equal_torch_pruning_and_the_formula():
    torch.manual_seed(4)
    weights = {"a": torch.randn(6, 3, 3, 3), "b": torch.randn(10, 6) * 0.01}
    scores = lamp_scores(weights)
    lamp = tp.pruner.importance.LAMPImportance()
    for name, w in weights.items():
        expected = lamp._normalize(w.flatten() ** 2, "lamp").view(w.shape)
        assert torch.allclose(scores[name], expected, rtol=1e-5)
    # Directly, with ties: w_u^2 / sum of w_v^2 over |w_v| >= |w_u|.
    w = torch.tensor([0.5, -1.0, 0.5, 2.0, 0.0, -0.5])
    direct = torch.stack([w[i] ** 2 / (w[w.abs() >= w[i].abs()] ** 2).sum() for i in range(w.numel())])
    assert torch.allclose(lamp_scores({"w": w})["w"], direct)
    assert lamp_scores({"w": w})["w"].max() == 1.0


def test_lamp_global_selection_against_a_direct_computation(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        # Layers on different scales: LAMP's layer ratios then differ from global magnitude pruning's.
        model[2].weight.mul_(10.0)
        model[4].weight.mul_(0.1)
    weights = dict(prunable_weights(model))
    plan = LAMP().plan(model, _ctx(tmp_path, 0.7, input_shape=(20,)))
    flat = []
    for w in weights.values():
        v = w.detach().flatten().double() ** 2
        flat.append(v / (v[None, :] * (v[None, :] >= v[:, None])).sum(1))
    flat = torch.cat(flat)
    k = flat.numel() - round(0.7 * flat.numel())
    threshold = torch.topk(flat, k).values.min()
    kept = torch.cat([m.flatten() for m in plan.masks.values()])
    assert int(kept.sum()) == k
    assert torch.all(flat[kept] >= threshold) and torch.all(flat[~kept] <= threshold)
    magnitude = unstructured_plan({n: w.detach().abs() for n, w in weights.items()}, 0.7)
    assert all(bool(m.any()) for m in plan.masks.values()) and not all(magnitude.masks[n].any() for n in weights)


# LAMP ranks across layers only (budget.scope=layer is refused).
@pytest.mark.parametrize(
    "method, scope", [(m, s) for m in ("snip", "grasp", "synflow", "lamp") for s in ("global", "layer")][:-1]
)
def test_masks_meet_the_sparsity_exactly(tmp_path, method, scope):
    model = create("resnet_tiny", num_classes=10)
    built = {
        "snip": lambda: SNIP(batches=2),
        "grasp": lambda: GraSP(samples_per_class=2),
        "synflow": lambda: SynFlow(iterations=5),
        "lamp": lambda: LAMP(),
    }[method]()
    target = 0.83
    plan = built.plan(model, _ctx(tmp_path, target, scope, data=_data()))
    counts = {n: (int((~m).sum()), m.numel()) for n, m in plan.masks.items()}
    assert list(counts) == [n for n, _ in prunable_weights(model)]
    if scope == "global":
        total = sum(n for _, n in counts.values())
        assert sum(p for p, _ in counts.values()) == round(target * total)
    else:
        assert all(p == round(target * n) for p, n in counts.values())


@pytest.mark.parametrize(
    "method, setting, message",
    [
        ("snip", "method.batches=0", "snip: method.batches=0 must be a whole number >= 1"),
        ("grasp", "method.samples_per_class=0", "grasp: method.samples_per_class=0 must be a whole number >= 1"),
        ("grasp", "method.temperature=0", "grasp: method.temperature=0 must be a number > 0"),
        ("synflow", "method.schedule=cubic", "synflow: method.schedule='cubic' is not one of exponential, linear"),
        ("synflow", "method.iterations=0", "synflow: method.iterations=0 must be a whole number >= 1"),
        ("lamp", "budget.scope=layer", "lamp: budget.scope='layer': LAMP ranks its scores across layers"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, method, setting, message):
    cfg = make_cfg(tmp_path, f"method={method}", "budget.sparsity=0.5", setting)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        pipeline.run(cfg, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "stages").exists()


@pytest.mark.slow
def test_a_bad_setting_is_one_line_from_the_command(tmp_path):
    # A subprocess: about 20 s on a loaded machine, hence slow (the in-process refusals above are fast).
    out = run_cli("dataset=synthetic", "backbone=resnet_tiny", "method=lamp", "budget.sparsity=0.5",
                  "budget.scope=layer", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "prunelab: error: lamp: budget.scope='layer': LAMP ranks its scores across layers (budget.scope=global); "
        "per layer it is magnitude pruning (method=magnitude budget.scope=layer)"
    ]


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "lamp"])
def test_a_run_prunes_trains_and_exports_at_the_sparsity(tmp_path, method):
    # The command's config, composed as `prunelab` composes it, run in this process (as tests/test_pruning.py does).
    extra = {"synflow": ["method.iterations=10"], "grasp": ["method.samples_per_class=4"]}.get(method, [])
    cfg = make_cfg(
        tmp_path,
        f"method={method}",
        *extra,
        "budget.sparsity=0.9",
        "retrain.epochs=1",
        "trainer.limit_train_batches=2",
        "test_pruned=true",
        "latency.batch_sizes=[]",
    )
    summary = pipeline.run(cfg, tmp_path)
    assert summary["model/sparsity"] == pytest.approx(0.9, abs=1e-4)
    # Tested right after pruning, then trained under the mask.
    assert "pruned/test/acc" in summary and "time/finetune_s" in summary
    exported = load_model(tmp_path / "model.pt")
    total = sum(w.numel() for _, w in prunable_weights(exported))
    assert sparsity(exported) == pytest.approx(0.9, abs=1.0 / total + 1e-9)


# Lottery Jackpots' Table 3 (ResNet-50 on ImageNet): each row's sparsity, top-1 and training epochs ("100 (T)").
@pytest.mark.parametrize(
    "name, kind, sparsity, acc, epochs",
    [
        ("snip_resnet50_imagenet", SNIP, 0.8, 69.67, 100),
        ("snip_resnet50_imagenet_sparsity90", SNIP, 0.9, 67.21, 100),
        ("grasp_resnet50_imagenet", GraSP, 0.8, 72.06, 150),
        ("grasp_resnet50_imagenet_sparsity90", GraSP, 0.9, 68.14, 150),
    ],
)
def test_imagenet_presets_carry_the_jackpot_papers_row(name, kind, sparsity, acc, epochs):
    cfg = preset(name)
    assert type(instantiate(cfg.method)) is kind and cfg.backbone.name == "resnet50"
    assert cfg.dataset._target_.endswith("ImageNetDataModule") and cfg.pretrain.epochs == 0
    assert cfg.budget.sparsity == cfg.paper.sparsity == sparsity and cfg.paper.acc == acc
    assert cfg.trainer.max_epochs == epochs and cfg.retrain.mode == "finetune" and cfg.retrain.epochs is None
    # The 90% presets differ from their 80% siblings only in the sparsity and the paper's row.
    sibling = OmegaConf.to_container(preset(name.removesuffix("_sparsity90")))
    mine = OmegaConf.to_container(cfg)
    for key in ("budget", "paper"):
        sibling.pop(key), mine.pop(key)
    assert mine == sibling


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "lamp"])
def test_round_to_leaves_the_weight_masks_as_they_are(tmp_path, method):
    # budget.round_to rounds kept channel counts; a weight mask meets the sparsity to the weight all the same.
    built = {"snip": SNIP, "grasp": lambda: GraSP(samples_per_class=2), "synflow": SynFlow, "lamp": LAMP}[method]
    masks = []
    for round_to in (1, 8):
        ctx = _ctx(tmp_path, 0.83, data=_data())
        ctx.budget.round_to = round_to
        torch.manual_seed(0)
        masks.append(built().plan(create("resnet_tiny", num_classes=10), ctx).masks)
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    total = sum(m.numel() for m in masks[1].values())
    assert sum(int((~m).sum()) for m in masks[1].values()) == round(0.83 * total)
