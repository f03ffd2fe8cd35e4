"""Lottery jackpots: SR-popup (method=jackpot) and edge-popup (method=edge_popup) on frozen weights.

Numbers checked: the straight-through gradient, the swap rule of Eqs. 28-30 and the q_t schedule of
Eq. 29, the initial mask of Eq. 8, the snip and grasp scores against direct autograd computations,
exact sparsity per layer, and weights bit-identical after a search run through the whole pipeline.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, CrashAtEpoch, make_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import keep_top, unstructured_plan
from prunelab.methods.jackpot import (
    EdgePopup,
    Jackpot,
    ScoredMask,
    ScoreSearch,
    criterion_scores,
    overlap,
    swap_,
    swap_count,
)
from prunelab.structure import MaskPlan, prunable_weights

QUIET = ["latency.batch_sizes=[]", "retrain=none"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _search_stage(method):
    (stage,) = [s for s in method.stages() if s.kind == "fit"]
    return stage


def test_swap_count_follows_eq_29():
    # q_t = ceil(n (1 - t/T)^4): 100 * 0.9^4 = 65.61, 100 * 0.5^4 = 6.25, 100 * 0.1^4 = 0.01.
    assert swap_count(100, 1, 10, restrict=True) == 66
    assert swap_count(100, 5, 10, restrict=True) == 7
    assert swap_count(100, 9, 10, restrict=True) == 1
    assert swap_count(100, 10, 10, restrict=True) == 0
    assert swap_count(0, 1, 10, restrict=True) == 0
    assert swap_count(100, 5, 10, restrict=True, exponent=1.0) == 50
    # Edge-popup makes every candidate swap.
    assert swap_count(100, 9, 10, restrict=False) == 100


def test_swap_pairs_highest_revived_with_lowest_repruned():
    key = torch.tensor([0.5, 0.9, 0.1, 0.8, 0.3, 0.7])
    kept = torch.tensor([True, True, True, False, False, False])
    # Top-3 of the new scores is {1, 3, 5}: 3 and 5 would revive, 0 and 2 would be re-pruned.
    one = kept.clone()
    assert swap_(key, one, lambda n: 1) == (2, 1)
    # The one allowed pair: the revived entry with the highest score (3), the kept one with the lowest (2).
    assert one.tolist() == [True, True, False, True, False, False]
    every = kept.clone()
    assert swap_(key, every, None) == (2, 2)
    assert every.tolist() == keep_top(key, 3).tolist() == [False, True, False, True, False, True]
    # Equal scores never swap: the current mask wins ties.
    ties = torch.tensor([False, True, False, True])
    assert swap_(torch.ones(4), ties, None) == (0, 0)
    assert ties.tolist() == [False, True, False, True]


def test_straight_through_estimator():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    w = layer.weight.detach().clone()
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    scores = torch.rand(3, 4) - 0.5
    for absolute in (False, True):
        param = ScoredMask(scores, mask, absolute=absolute)
        net = nn.Linear(4, 3)
        net.load_state_dict(layer.state_dict())
        net.weight.requires_grad_(False)
        torch.nn.utils.parametrize.register_parametrization(net, "weight", param)
        x = torch.randn(5, 4)
        out = net(x)
        # Forward: exactly the binary mask on the weights.
        assert torch.equal(out, nn.functional.linear(x, w * mask, layer.bias))
        out.sum().backward()
        # Backward: dL/dh = dL/d(w h) * w, handed unchanged to the scores (through |m| for edge-popup).
        dl_dh = x.sum(0).expand(3, 4) * w
        expected = dl_dh * scores.sign() if absolute else dl_dh
        assert torch.allclose(param.scores.grad, expected, atol=1e-6)


def _tiny_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def test_snip_and_grasp_scores_match_autograd():
    net = _tiny_net()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    weights = dict(prunable_weights(net))
    names = list(weights)
    flat = torch.cat([w.detach().flatten() for w in weights.values()])
    shapes = [w.shape for w in weights.values()]

    def loss_of(vector: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        w1, w2 = (part.view(s) for part, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        hidden = torch.tanh(nn.functional.linear(x, w1, net[0].bias))
        return nn.functional.cross_entropy(nn.functional.linear(hidden, w2, net[2].bias) / temperature, y)

    g = torch.autograd.functional.jacobian(loss_of, flat)
    snip = criterion_scores(net, weights, "snip", [(x, y)])
    assert torch.allclose(torch.cat([snip[n].flatten() for n in names]), (flat * g).abs(), atol=1e-6)

    # GraSP: Hg with the loss at temperature 200; the importance is w * Hg (GraSP removes large -w * Hg).
    tempered = lambda v: loss_of(v, 200.0)  # noqa: E731
    g200 = torch.autograd.functional.jacobian(tempered, flat)
    hg = torch.autograd.functional.hessian(tempered, flat) @ g200
    grasp = criterion_scores(net, weights, "grasp", [(x, y)])
    assert torch.allclose(torch.cat([grasp[n].flatten() for n in names]), flat * hg, rtol=1e-4, atol=1e-12)

    magnitude = criterion_scores(net, weights, "magnitude", [])
    assert all(torch.equal(magnitude[n], weights[n].detach().abs()) for n in names)


class _Ops(TorchDispatchMode):
    """Records each op run and the shape of its output."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[object, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out


@pytest.mark.parametrize("absolute, grad_scale", [(False, None), (True, None), (True, 0.3)])
def test_masked_weight_is_one_product_and_its_gradient_goes_straight_to_the_scores(absolute, grad_scale):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=gen)
    scores = torch.randn(6, 4, 3, 3, generator=gen)
    mask = (torch.rand(6, 4, 3, 3, generator=gen) > 0.5).float()
    layer = ScoredMask(scores, mask, absolute=absolute, grad_scale=grad_scale)
    with _Ops() as forward:
        out = layer(weight)
    # The masked weight is the only tensor of the weight's size made: no copy of the mask or of |scores|.
    assert torch.equal(out, weight * mask)
    assert [f for f, shape in forward.ops if shape == weight.shape] == [torch.ops.aten.mul.Tensor]
    upstream = torch.randn(weight.shape, generator=gen)
    out.backward(upstream)
    # Straight through: dL/dh = dL/d(w * h) * w, rescaled to mean magnitude grad_scale, then through |m|.
    expected = upstream * weight
    if grad_scale is not None:
        expected = expected * grad_scale / expected.abs().mean()
    if absolute:
        expected = expected * torch.sign(scores)
    assert torch.allclose(layer.scores.grad, expected, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


@pytest.mark.parametrize("allocation", ["magnitude", "uniform", "global"])
def test_initial_mask_and_exact_sparsity(allocation):
    model = create("resnet_tiny")
    weights = {n: w.detach().clone() for n, w in prunable_weights(model)}
    total = sum(w.numel() for w in weights.values())
    method = Jackpot(sparsity=0.9, allocation=allocation, epochs=1)
    method.setup(model, _search_stage(method), None)
    masks = method.masks()
    kept = {n: int(m.sum()) for n, m in masks.items()}
    # Exact overall, or to one weight per layer when every layer removes its own 90%.
    slack = len(weights) if allocation == "uniform" else 0
    assert abs(sum(kept.values()) - (total - round(0.9 * total))) <= slack
    # Eq. 8: scores 1 for the kept weights, eta = 0.99 for the pruned ones.
    for name, layer in method._layers.items():
        assert torch.equal(layer.scores.detach(), torch.where(masks[name], 1.0, 0.99))
    magnitude = unstructured_plan({n: w.abs() for n, w in weights.items()}, 0.9, "global").masks
    if allocation == "uniform":
        assert all(kept[n] == w.numel() - round(0.9 * w.numel()) for n, w in weights.items())
    else:
        # The magnitude layer ratios, and the magnitude mask itself, are where the search starts.
        assert all(torch.equal(masks[n].cpu(), magnitude[n]) for n in weights)
    # The model's parameters are frozen; only the scores train.
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith("scores"))
    assert [p.shape for p in method.parameters_to_train(model)] == [w.shape for w in weights.values()]


def test_dense_classifier_keeps_output_layer_out_of_the_search():
    model = create("resnet_tiny")
    names = [n for n, _ in prunable_weights(model)]
    method = Jackpot(sparsity=0.5, dense_classifier=True, epochs=1)
    method.setup(model, _search_stage(method), None)
    assert list(method.masks()) == names[:-1]
    method.teardown(model, _search_stage(method))
    assert list(model.prunelab.masks.masks) == names[:-1]


def test_edge_popup_mask_is_top_k_of_score_magnitudes_after_every_step():
    model = create("resnet_tiny")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    method = EdgePopup(sparsity=0.8, allocation="uniform", epochs=1)
    method.seed = 3
    stage = _search_stage(method)
    method.setup(model, stage, None)
    method.total_steps = 4
    optimizer = torch.optim.SGD(method.parameters_to_train(model), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        method.after_optimizer_step(model, step)
        record = method.history[-1]
        assert record["swaps"] == record["candidates"]
        for layer in method._layers.values():
            n = layer.mask.numel()
            assert int(layer.mask.sum()) == n - round(0.8 * n)
            assert torch.equal(layer.mask.bool(), keep_top(layer.scores.abs(), n - round(0.8 * n)))
    assert sum(sum(r["swaps"]) for r in method.history) > 0
    # The search computed no weight gradient: the frozen weights (and BN parameters) hold none.
    frozen = [p for n, p in model.named_parameters() if not n.endswith("scores")]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    method.teardown(model, stage)
    # The plain weights are back, untouched and trainable again; the mask waits for the prune stage.
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before if "running" not in n and "batches" not in n)
    assert all(p.requires_grad for p in model.parameters())
    assert model.prunelab.masks.sparsity() == pytest.approx(0.8, abs=1e-2)


def test_both_methods_share_the_search():
    # Edge-popup is the SR-popup search without the restriction and with its own initialisation.
    for hook in ("setup", "after_optimizer_step", "teardown", "plan", "parameters_to_train"):
        assert getattr(Jackpot, hook) is getattr(EdgePopup, hook) is getattr(ScoreSearch, hook), hook
    assert Jackpot(sparsity=0.5).short_restriction and not EdgePopup(sparsity=0.5).short_restriction


def test_configs_compose(tmp_path):
    for name, cls in (("jackpot", Jackpot), ("edge_popup", EdgePopup)):
        cfg = make_cfg(tmp_path, f"method={name}", "budget.sparsity=0.95", "method.epochs=10")
        method = instantiate(cfg.method)
        assert type(method) is cls and method.sparsity == 0.95
        stage = _search_stage(method)
        assert (stage.epochs, stage.lr, stage.optimizer["momentum"], stage.optimizer["weight_decay"]) == (
            10,
            0.1,
            0.9,
            5e-4,
        )


def test_jackpot_pipeline_freezes_weights_meets_sparsity_and_follows_q_schedule(tmp_path):
    L.seed_everything(0)
    pretrained = create("resnet_tiny")
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    reference = {n: t.clone() for n, t in pretrained.state_dict().items()}
    run = tmp_path / "run"
    cfg = make_cfg(
        run,
        "method=jackpot",
        f"backbone.pretrained={tmp_path / 'pretrained.pt'}",
        "budget.sparsity=0.9",
        "method.epochs=2",
        "dataset.batch_size=64",
        "method.overlap_with=[magnitude,random]",
        "test=false",
        *QUIET,
    )
    summary = pipeline.run(cfg, run)

    # Weights bit-identical after the search; BN running statistics follow the masked network, as in
    # the official code (the search runs in training mode).
    (search_dir,) = run.glob("stages/*-search")
    searched = load_model(search_dir / "model.pt").state_dict()
    for name, value in reference.items():
        if "running" in name or "num_batches" in name:
            continue
        assert torch.equal(searched[name], value), name
    assert any(not torch.equal(searched[n], reference[n]) for n in reference if n.endswith("running_mean"))

    # The final model: exactly the pretrained weights under the mask, 90% of them gone.
    final = load_model(run / "model.pt")
    masks = final.prunelab.masks.masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)
    assert summary["model/sparsity"] == pytest.approx(0.9, abs=1e-4)
    state = final.state_dict()
    for name, mask in masks.items():
        assert torch.equal(state[name], reference[name] * mask), name
    # Each layer keeps the count the global magnitude pruning gave it.
    magnitude = unstructured_plan({n: reference[n].abs() for n in masks}, 0.9, "global").masks
    assert {n: int(m.sum()) for n, m in masks.items()} == {n: int(m.sum()) for n, m in magnitude.items()}

    # Swaps per step: q_t = ceil(n_t (1 - t/T)^4) per layer, T = 2 epochs x 4 batches (224 images by 64).
    history = json.loads((run / "search_history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    for record in history:
        t = record["step"]
        for n, q in zip(record["candidates"], record["swaps"]):
            assert q == min(n, math.ceil(n * (1 - t / 8) ** 4)), (t, n, q)
    assert sum(history[-1]["swaps"]) == 0
    assert any(0 < q < n for r in history for n, q in zip(r["candidates"], r["swaps"]))
    # Eq. 7 against each criterion asked for, logged every step; the search left the magnitude mask.
    last = history[-1]
    assert {k for k in last if k.startswith("overlap/")} == {"overlap/magnitude", "overlap/random"}
    assert 0.9 < last["overlap/magnitude"] < 1.0
    flat_final = torch.cat([m.flatten() for m in masks.values()])
    flat_magnitude = torch.cat([magnitude[n].flatten() for n in masks])
    assert last["overlap/magnitude"] == pytest.approx(overlap(flat_final, flat_magnitude))

    # The search stage's checkpoint holds the scores and the mask, and loads with weights_only.
    checkpoint = torch.load(search_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.endswith("weight.0.scores") for k in checkpoint["state_dict"])
    assert any(k.endswith("weight.0.mask") for k in checkpoint["state_dict"])


def test_edge_popup_then_finetune_keeps_the_mask(tmp_path):
    summary = pipeline.run(
        make_cfg(
            tmp_path,
            "method=edge_popup",
            "budget.sparsity=0.8",
            "method.epochs=1",
            "method.overlap_with=[]",
            "latency.batch_sizes=[]",
            "retrain=finetune",
            "retrain.epochs=1",
            "test=false",
            "dataset.batch_size=64",
        ),
        tmp_path,
    )
    assert summary["model/sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert "finetune/train/loss" in summary and "search/val/acc" in summary and "test/acc" not in summary
    (prune_dir,) = tmp_path.glob("stages/*-prune")
    found = MaskPlan.load(prune_dir / "masks.pt").masks
    pruned = load_model(prune_dir / "model.pt").state_dict()
    final = load_model(tmp_path / "model.pt").state_dict()
    # Fine-tuning trains the kept weights; the pruned ones stay exactly zero.
    for name, mask in found.items():
        assert not final[name][~mask].any(), name
    assert any(not torch.equal(final[name][mask], pruned[name][mask]) for name, mask in found.items())


def _preset(*overrides: str):
    """The config as the CLI composes it, without the test suite's fast defaults (they would win)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp", *overrides])


@pytest.mark.parametrize("preset", ["resnet32_cifar10", "resnet32_cifar100", "vgg19_cifar10", "vgg19_cifar100"])
def test_paper_presets(preset):
    cfg = _preset(f"experiment=jackpot_{preset}", "backbone.pretrained=/weights.pt")
    assert cfg.retrain.mode == "none" and cfg.budget.sparsity == 0.9 and cfg.dataset.batch_size == 256
    assert cfg.backbone.name == preset.split("_")[0] and cfg.dataset._target_.endswith(
        "CIFAR100DataModule" if preset.endswith("100") else "CIFAR10DataModule"
    )
    assert cfg.backbone.width == (2.0 if preset.startswith("resnet32") else 1.0)
    assert cfg.dataset.val_size == 0
    method = instantiate(cfg.method)
    assert type(method) is Jackpot and method.epochs == 30 and method.dense_classifier and method.sparsity == 0.9
    assert cfg.backbone.pretrained == "/weights.pt"


@pytest.mark.parametrize("preset", ["resnet32_cifar10", "resnet32_cifar100", "vgg19_cifar10", "vgg19_cifar100"])
def test_global_presets_differ_from_their_siblings_only_in_the_allocation(preset):
    sibling = OmegaConf.to_container(_preset(f"experiment=jackpot_{preset}", "backbone.pretrained=/weights.pt"))
    paper = OmegaConf.to_container(_preset(f"experiment=jackpot_{preset}_global", "backbone.pretrained=/weights.pt"))
    assert (sibling["method"]["allocation"], paper["method"]["allocation"]) == ("magnitude", "global")
    sibling["method"]["allocation"] = "global"
    assert paper == sibling
    assert paper["method"]["layer_grad_norm"] is False


def _scored_gradients(
    method: ScoreSearch, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The scores' gradients of one backward pass on (x, y)."""
    for layer in method._layers.values():
        layer.scores.grad = None
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: layer.scores.grad.clone() for name, layer in method._layers.items()}


def test_layer_grad_norm_puts_every_layer_on_one_scale_and_is_off_by_default():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    plain = Jackpot(sparsity=0.9, allocation="global", epochs=1)
    assert not plain.layer_grad_norm
    torch.manual_seed(0)
    model = create("resnet_tiny").train()
    plain.setup(model, _search_stage(plain), None)
    raw = _scored_gradients(plain, model, x, y)
    means = [float(g.abs().mean()) for g in raw.values()]
    # Without it, the layers' score gradients differ in scale (the global ranking's problem).
    assert max(means) > 5 * min(means)

    method = Jackpot(sparsity=0.9, allocation="global", epochs=1, layer_grad_norm=True)
    method.data = SimpleNamespace(train_eval_dataloader=lambda: [(x, y)])
    torch.manual_seed(0)
    model = create("resnet_tiny").eval()
    buffers = {n: b.clone() for n, b in model.state_dict().items()}
    method.setup(model, _search_stage(method), None)
    # The scale: the mean |dL/dh| over all scored weights at the initial mask, measured in training mode
    # on the criterion batch; the measurement leaves BN statistics and the model's mode as they were.
    total = sum(g.numel() for g in raw.values())
    scale = sum(float(g.abs().sum()) for g in raw.values()) / total
    assert all(layer.grad_scale == pytest.approx(scale, rel=1e-5) for layer in method._layers.values())
    assert not model.training
    state = model.state_dict()
    assert all(torch.equal(state[n], b) for n, b in buffers.items() if n in state)
    model.train()
    normalised = _scored_gradients(method, model, x, y)
    for name, grad in normalised.items():
        # Each layer's gradient keeps its direction and gets the common mean magnitude.
        assert float(grad.abs().mean()) == pytest.approx(scale, rel=1e-4)
        assert torch.allclose(grad / grad.norm(), raw[name] / raw[name].norm(), atol=1e-5)

    # The global allocation records each layer's kept count after every step; their sum never moves.
    kept = sum(int(m.sum()) for m in method.masks().values())
    method.total_steps = 2
    optimizer = torch.optim.SGD(method.parameters_to_train(model), lr=0.5)
    optimizer.step()
    method.after_optimizer_step(model, 0)
    record = method.history[-1]
    assert record["kept"] == [int(m.sum()) for m in method.masks().values()] and sum(record["kept"]) == kept
    with pytest.raises(ValueError, match="layer_grad_norm needs `data`"):
        Jackpot(sparsity=0.9, layer_grad_norm=True).setup(create("resnet_tiny"), _search_stage(method), None)


def test_killed_search_resumes_from_its_scores_and_mask(tmp_path):
    L.seed_everything(0)
    pretrained = create("resnet_tiny")
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    run = tmp_path / "run"
    cfg = make_cfg(
        run,
        "method=jackpot",
        f"backbone.pretrained={tmp_path / 'pretrained.pt'}",
        "budget.sparsity=0.9",
        "method.epochs=2",
        "dataset.batch_size=64",
        "method.overlap_with=[magnitude]",
        "test=false",
        *QUIET,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, run, callbacks=[CrashAtEpoch(1)])
    (search_dir,) = run.glob("stages/*-search")
    saved = torch.load(search_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    saved_mask = torch.cat([v.flatten().bool() for k, v in saved.items() if k.endswith("weight.0.mask")])

    summary = pipeline.run(cfg, run)
    assert summary["model/sparsity"] == pytest.approx(0.9, abs=1e-4)
    history = json.loads((run / "search_history.json").read_text())
    # The resumed search runs iterations 5..8 of T = 8, still on the q_t schedule; the record of
    # iterations 1..4 came back with the method's state from the checkpoint.
    assert [r["step"] for r in history] == list(range(1, 9))
    for record in history:
        for n, q in zip(record["candidates"], record["swaps"]):
            assert q == min(n, math.ceil(n * (1 - record["step"] / 8) ** 4))
    # It went on from the checkpointed mask, not from a fresh magnitude mask: after its first step the
    # overlap with the magnitude mask differs from the checkpoint's by at most that step's swaps.
    weights = dict(prunable_weights(pretrained))
    magnitude = unstructured_plan({n: w.detach().abs() for n, w in weights.items()}, 0.9, "global").masks
    at_checkpoint = overlap(saved_mask, torch.cat([magnitude[n].flatten() for n in weights]))
    first = history[4]
    moved = 2 * sum(first["swaps"]) / saved_mask.numel()
    # The checkpointed mask is far enough from the magnitude mask that a restarted search could not pass.
    assert 1.0 - at_checkpoint > 2 * moved
    assert abs(first["overlap/magnitude"] - at_checkpoint) <= moved + 1e-12
