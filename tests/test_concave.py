"""Concave regularizers (Fracastoro et al.) and continuous sparsification: the relaxed mask, its
regularisers, the rounds with rewinding, and what survives a kill."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CrashAtEpoch, EpochRecorder, make_cfg, preset
from hydra.utils import instantiate

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, Stage
from prunelab.methods.concave import Concave, ContinuousSparsification, SoftMask, log_regularizer
from prunelab.structure import MaskPlan, prunable_weights

QUIET = ["latency.batch_sizes=[]", "quiet=true"]


def _run(tmp_path: Path, *overrides: str, callbacks=None) -> dict:
    cfg = make_cfg(tmp_path, "method=concave", "trainer.max_epochs=2", *QUIET, *overrides)
    return pipeline.run(cfg, tmp_path, callbacks=callbacks)


def _round_masks(run_dir: Path) -> list[MaskPlan]:
    return [MaskPlan.load(p) for p in sorted((run_dir / "stages").glob("r*-prune/masks.pt"))]


def _ctx(tmp_path: Path, round_: int = 1) -> MethodContext:
    return MethodContext(
        budget={},
        data=None,
        input_shape=(3, 32, 32),
        num_classes=10,
        seed=0,
        run_dir=tmp_path,
        round=round_,
    )


def test_log_regularizer_and_its_gradient_follow_the_formula():
    eps = 0.1
    m = torch.tensor([0.0, 0.01, 0.3, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    value = log_regularizer(m, eps)
    assert float(value[-1].detach()) == pytest.approx(1.0)
    expected = torch.log((m.detach() + eps) / eps) / math.log((1 + eps) / eps)
    assert torch.allclose(value, expected) and value[0] == 0
    value.sum().backward()
    assert torch.allclose(m.grad, 1.0 / ((m.detach() + eps) * math.log((1 + eps) / eps)))
    # Concave: the gradient falls as m grows, so small masks are pushed hardest towards zero.
    assert (m.grad[:-1] > m.grad[1:]).all()


def test_concave_settings_are_checked_before_any_work():
    for kwargs, message in [
        ({"regularizer": "l2"}, "regularizer"),
        ({"alpha": 0.0}, "alpha"),
        ({"selection": "top"}, "selection"),
        ({"rounds": 0}, "rounds"),
        ({"evaluate": "some"}, "evaluate"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Concave(**kwargs)
    with pytest.raises(ConfigError, match="final_beta"):
        ContinuousSparsification(final_beta=0.5)
    # The paper's lambdas by regulariser (Section V-A).
    assert Concave(regularizer="l1").lam == 3e-6 and Concave(regularizer="log").lam == 1e-6


def test_projection_keeps_masks_in_unit_interval_and_fixed_entries_at_zero(tmp_path):
    model = create("resnet_tiny", num_classes=10)
    method = Concave()
    method.setup(model, Stage("search", "fit", round=1), _ctx(tmp_path))
    layer = next(iter(method._layers.values()))
    layer.alive[0] = False
    with torch.no_grad():
        layer.values.copy_(torch.randn_like(layer.values) * 3)
    method.after_optimizer_step(model, 0)
    values = layer.values.detach()
    assert values.min() >= 0 and values.max() <= 1 and (values[0] == 0).all()
    assert ((values == 0) | (values == 1)).float().mean() > 0.5  # most of N(0, 9) lies outside [0, 1]
    # The weight the layer computes with is m * theta, entries fixed at zero give exact zeros.
    name = next(iter(method._layers))
    module = model.get_submodule(name.rsplit(".", 1)[0])
    original = module.parametrizations.weight.original
    assert torch.equal(module.weight, original * values) and (module.weight[0] == 0).all()


def test_masks_have_their_own_group_without_weight_decay_and_the_regulariser_covers_all_weights(tmp_path):
    model = create("resnet_tiny", num_classes=10)
    method = Concave(regularizer="l1", lam=1e-3)
    method.setup(model, Stage("search", "fit", round=1), _ctx(tmp_path))
    weights, masks = method.parameters_to_train(model)
    assert masks["weight_decay"] == 0.0 and "weight_decay" not in weights
    mask_ids = {id(p) for p in masks["params"]}
    assert not mask_ids & {id(p) for p in weights["params"]}
    assert len(weights["params"]) + len(masks["params"]) == len(list(model.parameters()))
    # lambda * sum of m over every prunable weight, at m_0 = 1/2.
    count = sum(w.numel() for _, w in prunable_weights(model))
    assert float(method.extra_loss(model).detach()) == pytest.approx(1e-3 * 0.5 * count, rel=1e-6)


def test_cs_beta_schedule_and_restart():
    method = ContinuousSparsification(final_beta=200.0, mask_init=0.0)
    betas = [method.beta(t, 5) for t in range(5)]
    assert betas[0] == 1.0 and betas[-1] == pytest.approx(200.0)
    assert all(b / a == pytest.approx(200.0**0.25) for a, b in itertools.pairwise(betas))
    # s <= 0 is fixed at zero; the others restart at min(beta_T * s, s_0).
    method.values = {"w": torch.tensor([-0.3, 0.0, 1e-4, 0.2])}
    method.alive = {"w": torch.tensor([True, True, True, False])}
    keep = method.select(1)
    assert keep["w"].tolist() == [False, False, True, False]
    method.restart(keep)
    assert method.values["w"].tolist() == pytest.approx([-60.0, 0.0, 0.0, 0.0])
    # The official code's rescaling makes the starting mask exactly 1 (the dense network).
    layer = SoftMask(
        torch.full((3,), -0.5),
        torch.ones(3, dtype=torch.bool),
        sigmoid=True,
        scale=ContinuousSparsification(mask_init=-0.5).scale(),
    )
    assert torch.allclose(layer.mask(), torch.ones(3))


class _Watch(L.Callback):
    """The soft masks of every search: their beta per epoch, and the raw weights when a search starts."""

    def __init__(self):
        self.betas: dict[str, list[float]] = {}
        self.start: dict[str, dict[str, torch.Tensor]] = {}
        self.low: dict[str, float] = {}

    def _layers(self, pl_module):
        return pl_module.method._layers

    def on_fit_start(self, trainer, pl_module):
        if pl_module.stage.endswith("/search"):
            self.start[pl_module.stage] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = self._layers(pl_module)
        if layers and batch_idx == 0:
            self.betas.setdefault(pl_module.stage, []).append(next(iter(layers.values())).beta)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for layer in self._layers(pl_module).values():
            values = layer.values.detach()
            self.low[pl_module.stage] = min(self.low.get(pl_module.stage, 1.0), float(values.min()))
            # Projected after every step; fixed entries stay at zero.
            if not getattr(layer, "sigmoid", False):
                assert values.min() >= 0 and values.max() <= 1
                assert (values[~layer.alive] == 0).all()


def test_concave_rounds_fix_small_masks_at_zero_rewind_bit_exactly_and_only_shrink(tmp_path):
    watch = _Watch()
    # alpha near m_0 so that a short search already fixes many masks at zero.
    summary = _run(
        tmp_path,
        "method.rounds=3",
        "method.alpha=0.5",
        "method.lam=1e-3",
        "method.regularizer=log",
        "test_pruned=true",
        callbacks=[watch],
    )
    masks = _round_masks(tmp_path)
    assert len(masks) == 3
    sparsities = [m.sparsity() for m in masks]
    assert 0 < sparsities[0] < sparsities[1] < sparsities[2] < 1
    for earlier, later in itertools.pairwise(masks):
        assert all(not (later.masks[n] & ~earlier.masks[n]).any() for n in earlier.masks)
    for r in (1, 2, 3):
        assert summary[f"round{r}/sparsity"] == pytest.approx(sparsities[r - 1])
        assert 0 <= summary[f"round{r}/test/acc"] <= 100
        # The search's own network (m * theta folded), tested right after the prune.
        assert 0 <= summary[f"round{r}/pruned/test/acc"] <= 100
    # Every search starts from theta_0 (under the masks so far), bit for bit.
    init = load_model(tmp_path / "rewind.pt").state_dict()
    for r, mask in ((2, masks[0]), (3, masks[1])):
        start = watch.start[f"round{r}/search"]
        for name, keep in mask.masks.items():
            original = start[name[: -len("weight")] + "parametrizations.weight.original"]
            assert torch.equal(original, init[name] * keep), (r, name)
    # The masks carried over: round 2's search starts from round 1's m, zeros where fixed.
    state = torch.load(tmp_path / "stages" / "r1-1-prune" / "method.pt", weights_only=True)
    for name, keep in masks[0].masks.items():
        values = state["values"][name]
        assert (values[~keep] == 0).all() and (values[keep] >= 0.5).all()
        assert torch.equal(
            watch.start["round2/search"][name[: -len("weight")] + "parametrizations.weight.0.values"], values
        )
    # The final model holds exact zeros where the last round's mask prunes, and is the last round's ticket.
    final = load_model(tmp_path / "model.pt")
    for name, weight in prunable_weights(final):
        assert (weight[~masks[-1].masks[name]] == 0).all()
    assert summary["model/sparsity"] == pytest.approx(sparsities[-1], abs=1e-3)
    assert summary["test/acc"] == summary["round3/test/acc"]
    history = json.loads((tmp_path / "soft_masks.json").read_text())
    assert [h["round"] for h in history] == [1, 2, 3] and (tmp_path / "soft_masks.png").exists()


def test_fixed_fraction_selection_prunes_the_paper_fractions(tmp_path):
    summary = _run(
        tmp_path,
        "method.rounds=2",
        "method.selection=fixed_fraction",
        "method.prune_fraction=0.3",
        "method.evaluate=last",
    )
    masks = _round_masks(tmp_path)
    assert masks[0].sparsity() == pytest.approx(0.3, abs=1e-4) and masks[1].sparsity() == pytest.approx(0.51, abs=1e-4)
    assert "round1/test/acc" not in summary and "round2/test/acc" in summary
    assert not (tmp_path / "stages" / "r1-2-rewind").exists()


def test_cs_raises_beta_every_epoch_and_prunes_where_s_is_not_positive(tmp_path):
    watch = _Watch()
    summary = _run(
        tmp_path, "method=cs", "method.rounds=2", "trainer.max_epochs=3", "method.lam=1e-4", callbacks=[watch]
    )
    assert watch.betas["round1/search"] == pytest.approx([1.0, 200.0**0.5, 200.0])
    assert watch.betas["round2/search"] == pytest.approx([1.0, 200.0**0.5, 200.0])
    masks = _round_masks(tmp_path)
    assert 0 < masks[0].sparsity() < masks[1].sparsity() < 1
    assert all(not (masks[1].masks[n] & ~masks[0].masks[n]).any() for n in masks[0].masks)
    assert summary["round2/sparsity"] == pytest.approx(masks[1].sparsity())


def test_a_killed_search_resumes_to_the_same_masks_and_accuracy(tmp_path):
    reference = _run(tmp_path / "ref", "method.rounds=2", "method.alpha=0.5", "method.lam=1e-3")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(
            run,
            "method.rounds=2",
            "method.alpha=0.5",
            "method.lam=1e-3",
            callbacks=[CrashAtEpoch(1, stage="round2/search")],
        )
    recorder = EpochRecorder()
    summary = _run(run, "method.rounds=2", "method.alpha=0.5", "method.lam=1e-3", callbacks=[recorder])
    assert recorder.stages[0] == ("round2/search", 1)
    for ref, got in zip(_round_masks(tmp_path / "ref"), _round_masks(run)):
        assert all(torch.equal(ref.masks[n], got.masks[n]) for n in ref.masks)
    ref_state = torch.load(tmp_path / "ref" / "stages" / "r2-2-prune" / "method.pt", weights_only=True)
    got_state = torch.load(run / "stages" / "r2-2-prune" / "method.pt", weights_only=True)
    assert all(torch.equal(ref_state["values"][n], got_state["values"][n]) for n in ref_state["values"])
    for key in ("round1/test/acc", "round2/test/acc", "round2/sparsity", "test/loss"):
        assert summary[key] == reference[key], key


@pytest.mark.parametrize("arch", ["resnet20", "vgg11", "wrn20"])
@pytest.mark.parametrize("reg", ["l1", "log"])
@pytest.mark.parametrize("data", ["cifar10", "cifar100", "tiny_imagenet"])
def test_concave_presets_follow_the_papers_protocol(arch, reg, data):
    cfg = preset(f"concave_{arch}_{data}_{reg}")
    epochs, milestones = (85, [56, 71]) if arch == "resnet20" else (120, [60, 90])
    assert cfg.dataset._target_.endswith(
        {"cifar10": "CIFAR10DataModule", "cifar100": "CIFAR100DataModule", "tiny_imagenet": "TinyImageNetDataModule"}[
            data
        ]
    )
    assert (cfg.dataset.batch_size, cfg.trainer.max_epochs, list(cfg.scheduler.milestones)) == (128, epochs, milestones)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.retrain.mode, cfg.retrain.rewind_iteration) == ("rewind", 0)
    method = instantiate(cfg.method)
    assert isinstance(method, Concave) and method.rounds == 3 and method.kind == reg
    assert method.lam == (3e-6 if reg == "l1" else 1e-6) and method.eps == 0.1
    assert method.dense_output == (arch == "vgg11")
    assert cfg.backbone.name == arch


def test_resnet56_and_cs_presets():
    for reg in ("l1", "log"):
        cfg = preset(f"concave_resnet56_cifar10_{reg}")
        assert cfg.backbone.name == "resnet56" and instantiate(cfg.method).kind == reg
    for data in ("cifar10", "cifar100"):
        method = instantiate(preset(f"cs_resnet20_{data}").method)
        assert isinstance(method, ContinuousSparsification)
        assert (method.lam, method.beta_final, method.mask_init, method.rounds) == (1e-8, 200.0, 0.0, 3)
