"""Dynamic sparse training: SET (method=set) and RigL (method=rigl).

Numbers checked: ERK/ER densities against the formula with budgets met to the weight, RigL's cosine drop
fraction and per-layer drop counts, grown connections against a directly computed dense gradient, SET's
regrowth among inactive positions only, constant per-layer counts through the stage, a run killed mid-stage
ending bit-identically to an unbroken one, refused settings, and short CLI runs to the exact budget.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, CrashAtStep, make_cfg, preset, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import keep_counts, layer_densities
from prunelab.errors import ConfigError
from prunelab.methods.base import Stage
from prunelab.methods.rigl import RigL, cosine_drop_fraction
from prunelab.methods.set import SET
from prunelab.structure import MaskPlan, prunable_weights

QUIET = ["latency.batch_sizes=[]", "test=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _erk_raw(shape):
    return sum(shape) / math.prod(shape)


def test_erk_densities_follow_the_formula_and_meet_the_budget_to_the_weight():
    # A tiny hand case: the small layer's ERK density would exceed 1, so it is dense and eps is solved over the big one.
    shapes = {"a": (4, 2), "b": (100, 100)}
    densities = layer_densities(shapes, 0.5, "erk")
    assert densities["a"] == 1.0
    # 10,008 weights, 5,004 kept: the big layer keeps 5,004 - 8 at eps * raw = (4996 / (0.02 * 10000)) * 0.02.
    assert densities["b"] == pytest.approx(4996 / 10000)
    assert keep_counts(shapes, 0.5, "erk") == {"a": 8, "b": 4996}

    model = create("resnet_tiny")
    shapes = {n: tuple(w.shape) for n, w in prunable_weights(model)[1:]}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    for sparsity in (0.5, 0.9, 0.95, 0.99):
        for distribution, raw in (("erk", _erk_raw), ("er", lambda s: (s[0] + s[1]) / (s[0] * s[1]))):
            densities = layer_densities(shapes, sparsity, distribution)
            dense = {n for n, d in densities.items() if d == 1.0}
            scaled = [n for n in shapes if n not in dense]
            # The direct computation: eps over the layers left sparse, from the weights they must keep.
            kept = (1 - sparsity) * total - sum(sizes[n] for n in dense)
            eps = kept / sum(raw(shapes[n]) * sizes[n] for n in scaled)
            for n in scaled:
                assert densities[n] == pytest.approx(eps * raw(shapes[n]), rel=1e-9)
                assert densities[n] <= 1.0
            # A layer made dense had a raw density at least that of every layer left sparse.
            assert all(raw(shapes[d]) >= max(raw(shapes[n]) for n in scaled) for d in dense)
            counts = keep_counts(shapes, sparsity, distribution)
            assert sum(counts.values()) == total - round(sparsity * total)
            assert all(abs(counts[n] - densities[n] * sizes[n]) < 1 for n in shapes)
        counts = keep_counts(shapes, sparsity, "uniform")
        assert sum(counts.values()) == total - round(sparsity * total)
        assert all(abs(counts[n] - (1 - sparsity) * sizes[n]) < 1 for n in shapes)
    # ERK keeps small layers denser than large ones at 90%: the classifier (640 weights) over the last 3x3x64x64 conv.
    densities = layer_densities(shapes, 0.9, "erk")
    assert densities["linear.weight"] > densities["layer3.0.conv2.weight"]


class _Net(nn.Module):
    """A tiny conv net: three masked layers after a dense stem, small enough for direct computations.

    tanh instead of ReLU: no unit is dead on a batch, so no two gradients tie at exactly zero.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 16, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.tanh(self.conv(torch.tanh(self.stem(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc(torch.tanh(self.hidden(x)))


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _start(method, model, total_steps):
    method.seed = 0
    method.setup(model, Stage("sparse", "fit"), None)
    method.on_fit_start(model, "sparse", total_steps)
    method.on_train_epoch_start(model, 0, 1)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, optimizer, step):
    x, y = _batch(step)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_rigl_drop_fraction_is_cosine_and_counts_follow_it_at_each_update():
    torch.manual_seed(0)
    model = _Net()
    method = RigL(sparsity=0.8, update_every=3, alpha=0.3, end=0.75)
    total = 20
    optimizer = _start(method, model, total)
    counts = {n: int(m.sum()) for n, m in method.masks().items()}
    for step in range(total):
        _step(model, optimizer, step)
        method.after_optimizer_step(model, step)
        metrics = method.step_metrics(model)
        t = step + 1
        updated = t % 3 == 0 and t < 0.75 * total
        assert bool(metrics) == updated
        if updated:
            fraction = 0.3 / 2 * (1 + math.cos(math.pi * t / 15.0))
            assert metrics["drop_fraction"] == pytest.approx(fraction)
            assert method.history[-1]["dropped"] == [math.floor(fraction * counts[n]) for n in counts]
            assert metrics["grown"] == metrics["dropped"] == sum(math.floor(fraction * c) for c in counts.values())
        # The sparsity never moves: every layer keeps its count at every step.
        assert {n: int(m.sum()) for n, m in method.masks().items()} == counts
    assert [r["step"] for r in method.history] == [3, 6, 9, 12]
    assert cosine_drop_fraction(0.3, 0, 15.0) == pytest.approx(0.3)
    assert cosine_drop_fraction(0.3, 15, 15.0) == 0.0


def test_rigl_grows_where_the_dense_gradient_is_largest_among_positions_not_kept():
    torch.manual_seed(0)
    model = _Net()
    method = RigL(sparsity=0.7, update_every=1, alpha=0.3, end=1.0)
    optimizer = _start(method, model, 4)
    for step in range(2):
        before = method.masks()
        # The dense gradient computed directly: a plain copy of the network with the masked weights as its weights.
        plain = _Net()
        state = {k.replace("parametrizations.", "").replace(".original", ""): v for k, v in model.state_dict().items()}
        plain.load_state_dict({k: v for k, v in state.items() if not k.endswith(".0.mask")})
        with torch.no_grad():
            for name, mask in before.items():
                plain.get_parameter(name).mul_(mask)
        x, y = _batch(step)
        nn.functional.cross_entropy(plain(x), y).backward()
        dense = {name: plain.get_parameter(name).grad.clone() for name in before}
        assert any((dense[n][~before[n]] != 0).any() for n in before)

        _step(model, optimizer, step)
        stored = {n: model.get_submodule(n.rpartition(".")[0]).parametrizations.weight.original for n in before}
        after_step = {n: (stored[n] * before[n]).detach().clone() for n in before}
        method.after_optimizer_step(model, step)
        fraction = cosine_drop_fraction(0.3, step + 1, 4.0)
        for name, mask in method.masks().items():
            old = before[name].flatten()
            active = int(old.sum())
            n_drop = math.floor(fraction * active)
            assert n_drop > 0
            # Drop: the active weights of smallest magnitude after the optimizer step.
            magnitude = after_step[name].flatten().abs()
            order = torch.argsort(torch.where(old, magnitude, torch.tensor(math.inf)))
            kept = old.clone()
            kept[order[:n_drop]] = False
            # Grow: the largest |dense gradient| among the positions not kept.
            candidates = torch.where(kept, torch.tensor(-1.0), dense[name].flatten().abs())
            grown = torch.zeros_like(kept)
            grown[torch.topk(candidates, n_drop).indices] = True
            assert torch.equal(mask.flatten(), kept | grown)
            # New connections start at zero; dropped ones are zeroed; the others kept their values.
            new = grown & ~old
            value = stored[name].detach().flatten()
            assert (value[new] == 0).all() and (value[~mask.flatten()] == 0).all()
            same = kept | (grown & old)
            assert torch.equal(value[same], after_step[name].flatten()[same])


def test_set_regrows_among_inactive_positions_only_and_keeps_every_layer_count():
    torch.manual_seed(0)
    model = _Net()
    method = SET(sparsity=0.8, update_every=2, zeta=0.3)
    optimizer = _start(method, model, 12)
    counts = {n: int(m.sum()) for n, m in method.masks().items()}
    grown_total = 0
    for step in range(12):
        before = method.masks()
        _step(model, optimizer, step)
        stored = {n: model.get_submodule(n.rpartition(".")[0]).parametrizations.weight.original for n in before}
        after_step = {n: (stored[n] * before[n]).detach().clone() for n in before}
        method.after_optimizer_step(model, step)
        now = method.masks()
        assert {n: int(m.sum()) for n, m in now.items()} == counts
        if (step + 1) % 2 or step + 1 >= 12:
            assert all(torch.equal(now[n], before[n]) for n in now)
            continue
        for name in now:
            old, new = before[name].flatten(), now[name].flatten()
            n_drop = math.floor(0.3 * counts[name])
            # The survivors are the active weights of largest magnitude; every other position grown was inactive then.
            magnitude = after_step[name].flatten().abs()
            survivors = torch.zeros_like(old)
            survivors[torch.topk(torch.where(old, magnitude, torch.tensor(-1.0)), counts[name] - n_drop).indices] = True
            assert (new & survivors).sum() == counts[name] - n_drop
            grown = new & ~survivors
            assert int(grown.sum()) == n_drop and not (grown & survivors).any()
            grown_total += int((grown & ~old).sum())
            assert (stored[name].detach().flatten()[grown & ~old] == 0).all()
    # Random regrowth does reach new positions (not only the just-dropped ones).
    assert grown_total > 0
    assert [r["step"] for r in method.history] == [2, 4, 6, 8, 10]


def test_set_updates_once_per_epoch_by_default():
    method = SET(sparsity=0.9)
    method.total_steps, method.steps_per_epoch = 30, 10
    assert [t for t in range(1, 31) if method.is_update(t)] == [10, 20]


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (RigL, {"sparsity": 1.0}, "budget.sparsity"),
        (RigL, {"alpha": 1.5}, "method.alpha"),
        (RigL, {"update_every": 0}, "method.update_every"),
        (RigL, {"update_every": None}, "method.update_every"),
        (RigL, {"end": 0.0}, "method.end"),
        (RigL, {"distribution": "erdos"}, "method.distribution"),
        (RigL, {"init": "snip"}, "method.init"),
        (RigL, {"epochs": 0}, "method.epochs"),
        (SET, {"zeta": -0.1}, "method.zeta"),
        (SET, {"update_every": 2.5}, "method.update_every"),
    ],
)
def test_bad_settings_are_refused_in_one_line(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        cls(**kwargs)
    assert "\n" not in str(caught.value)


def test_a_bad_setting_stops_the_command_before_any_work(tmp_path):
    result = run_cli("dataset=synthetic", "method=rigl", "budget.sparsity=0.9", "method.alpha=2", cwd=tmp_path)
    assert result.returncode == 2
    assert "method.alpha=2" in result.stderr and not list(tmp_path.glob("outputs/runs/*/stages"))


def _run(root, *overrides, callbacks=None):
    cfg = make_cfg(root, *QUIET, "budget.sparsity=0.9", "trainer.max_epochs=2", *overrides)
    return pipeline.run(cfg, root, callbacks=callbacks)


def _final(root):
    (prune,) = root.glob("stages/*-prune")
    masks = MaskPlan.load(prune / "masks.pt").masks
    return masks, load_model(root / "model.pt").state_dict()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_a_run_killed_mid_stage_ends_with_the_masks_and_weights_of_an_unbroken_run(tmp_path, method):
    args = [f"method={method}", "method.update_every=2", "checkpoint_every_n_steps=1"]
    reference = _run(tmp_path / "ref", *args)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "run", *args, callbacks=[CrashAtStep(9, "sparse")])
    saved = torch.load(tmp_path / "run/stages/0-sparse/checkpoints/last.ckpt", weights_only=True)["prunelab_method"]
    assert saved["step"] == 9 and saved["updates"] == 4
    resumed = _run(tmp_path / "run", *args)
    masks, weights = _final(tmp_path / "run")
    ref_masks, ref_weights = _final(tmp_path / "ref")
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[n], ref_masks[n]) for n in masks)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    history = json.loads((tmp_path / "run" / f"{method}_updates.json").read_text())
    assert history == json.loads((tmp_path / "ref" / f"{method}_updates.json").read_text())
    comparable = lambda s: {k: v for k, v in s.items() if not k.startswith("time/")}  # noqa: E731
    assert comparable(resumed) == comparable(reference)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_cli_runs_to_the_exact_sparsity(tmp_path, method):
    result = run_cli(
        "dataset=synthetic",
        "backbone=resnet_tiny",
        f"method={method}",
        "budget.sparsity=0.9",
        "trainer.max_epochs=2",
        "method.update_every=3",
        "trainer.enable_progress_bar=false",
        "latency.batch_sizes=[]",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "runs").glob("*")
    summary = json.loads((run / "summary.json").read_text())
    model = load_model(run / "model.pt")
    weights = prunable_weights(model)
    masked = dict(weights[1:])
    total = sum(w.numel() for w in masked.values())
    # The masked layers keep exactly total - round(0.9 total) weights; the first layer stays dense.
    plan = model.prunelab.masks
    assert set(plan.masks) == set(masked)
    assert sum(int(m.sum()) for m in plan.masks.values()) == total - round(0.9 * total)
    assert all(int((masked[n][~m] != 0).sum()) == 0 for n, m in plan.masks.items())
    assert summary["prune/sparsity"] == pytest.approx(0.9, abs=1e-4)
    first = weights[0][1]
    all_weights = total + first.numel()
    assert summary["model/sparsity"] >= round(0.9 * total) / all_weights - 1e-12
    assert summary["model/sparsity"] == pytest.approx(round(0.9 * total) / all_weights, abs=2e-3)
    updates = json.loads((run / f"{method}_updates.json").read_text())
    # 14 steps: updates at 3, 6, 9 (and 12 for SET, whose updates run to the stage's end; RigL's stop at 0.75 T).
    assert [u["step"] for u in updates] == ([3, 6, 9, 12] if method == "set" else [3, 6, 9])
    assert "test/acc" in summary


def test_method_configs_build_the_paper_defaults():
    built = {}
    for name in ("rigl", "set"):
        node = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
        node.pop("defaults")
        node.sparsity = 0.9
        built[name] = method = instantiate(node)
        assert method.distribution == "erk" and method.init == "random"
        assert method.dense_first_layer and not method.dense_last_layer
    rigl, set_ = built["rigl"], built["set"]
    assert isinstance(rigl, RigL) and (rigl.alpha, rigl.update_every, rigl.end) == (0.3, 100, 0.75)
    assert isinstance(set_, SET) and (set_.zeta, set_.update_every, set_.end) == (0.3, None, 1.0)


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem.startswith(("set_", "rigl_")))
)
def test_presets_compose_with_the_paper_figure(name):
    cfg = preset(name)
    assert cfg.method._target_.endswith((".SET", ".RigL")) and cfg.paper.acc > 0
    assert cfg.budget.sparsity == pytest.approx(cfg.paper.sparsity)


def test_updates_work_on_channels_last_weights_and_match_the_contiguous_model():
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _Net()
        method = RigL(sparsity=0.8, update_every=1, end=1.0)
        optimizer = _start(method, model, 3)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            assert not model.conv.parametrizations.weight.original.is_contiguous()
        for step in range(2):
            _step(model, optimizer, step)
            method.after_optimizer_step(model, step)
        results.append(method.masks())
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("cls", [SET, RigL])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_an_update_zeroes_the_optimizer_state_of_new_connections_only(cls, optimizer_name):
    # RigL's code (SparseRigLOptimizer.reset_momentum): every slot of a newly grown connection is set to zero.
    torch.manual_seed(0)
    model = _Net()
    method = cls(sparsity=0.5, update_every=2, end=1.0)
    _start(method, model, 12)
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        if optimizer_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    carried = 0
    for step in range(12):
        _step(model, optimizer, step)
        before = {n: m.clone() for n, m in method.masks().items()}
        state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        method.after_optimizer_step(model, step)
        method.reset_optimizer_state(optimizer)
        after = method.masks()
        new = {n: after[n] & ~before[n] for n in after}
        assert all(torch.equal(new[n], torch.zeros_like(new[n])) for n in new) == (not method.is_update(step + 1))
        for param, slots in optimizer.state.items():
            name = next((n for n, p in method._stored.items() if p is param), None)
            for key, value in slots.items():
                old = state[id(param)][key]
                if name is None or value.shape != param.shape:  # other parameters, Adam's step count: untouched
                    assert torch.equal(value, old)
                    continue
                grown = new[name].to(value.device)
                assert torch.equal(value[grown], torch.zeros_like(value[grown]))
                assert torch.equal(value[~grown], old[~grown])
                carried += int(old[grown].count_nonzero())
    # Some grown connections had been dropped at an earlier update and held momentum then: the reset was needed.
    assert carried > 0


class _NewConnectionsState(L.Callback):
    """After every training batch: the optimizer's state of the connections the step's update grew anew."""

    def __init__(self):
        self.masks, self.new_state = None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        method = pl_module.method
        if not method._layers:
            return
        masks = method.masks()
        if self.masks is not None:
            optimizer = trainer.optimizers[0]
            for name, mask in masks.items():
                new = mask & ~self.masks[name]
                if new.any():
                    buffer = optimizer.state[method._stored[name]]["momentum_buffer"]
                    self.new_state.append(buffer[new.to(buffer.device)].clone())
        self.masks = masks


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_the_training_stage_resets_the_momentum_of_new_connections(tmp_path, method):
    seen = _NewConnectionsState()
    _run(tmp_path, f"method={method}", "method.update_every=2", "budget.sparsity=0.5", callbacks=[seen])
    assert len(seen.new_state) > 3 and all(torch.equal(s, torch.zeros_like(s)) for s in seen.new_state)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_round_to_leaves_the_dynamic_masks_as_they_are(tmp_path, method):
    # budget.round_to rounds kept channel counts: the masks of a run with it equal those of a run without.
    args = [f"method={method}", "method.update_every=2"]
    _run(tmp_path / "plain", *args)
    _run(tmp_path / "rounded", *args, "budget.round_to=8")
    plain, rounded = _final(tmp_path / "plain")[0], _final(tmp_path / "rounded")[0]
    assert plain.keys() == rounded.keys() and all(torch.equal(plain[n], rounded[n]) for n in plain)
