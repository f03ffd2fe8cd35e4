"""Iteration in the core, with IMP as its first client: rounds, masks that only shrink, rewinding,
method state across a resume, parameter groups, per-step schedules, stop conditions, and every
method's YAML through a one-batch pipeline."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, CrashAtEpoch, EpochRecorder, make_cfg, preset
from hydra.utils import instantiate
from torch import nn

from prunelab import load_model, pipeline
from prunelab.backbones import create
from prunelab.budget import BudgetError
from prunelab.errors import ConfigError
from prunelab.guard import FEW_STEPS
from prunelab.methods.base import MethodContext, PruningMethod, Stage
from prunelab.methods.imp import IMP, round_sparsities
from prunelab.structure import MaskPlan, prunable_weights

QUIET = ["latency.batch_sizes=[]", "trainer.limit_val_batches=1"]
# 224 training images at batch 32: 7 optimizer steps per epoch.
STEPS_PER_EPOCH = 7


def _imp(tmp_path: Path, *overrides: str, callbacks=None):
    cfg = make_cfg(tmp_path, "method=imp", "budget.sparsity=0.488", "method.rounds=3", *QUIET, *overrides)
    return pipeline.run(cfg, tmp_path, callbacks=callbacks)


def _round_masks(run_dir: Path, rounds: int = 3) -> list[MaskPlan]:
    return [MaskPlan.load(run_dir / "stages" / f"r{r}-0-prune" / "masks.pt") for r in range(1, rounds + 1)]


def test_round_sparsities():
    assert round_sparsities(0.2, rounds=3) == pytest.approx([0.2, 0.36, 0.488])
    assert round_sparsities(0.5, rounds=3, sparsity=0.488) == pytest.approx([0.2, 0.36, 0.488])
    # budget.sparsity alone: the rounds of prune_fraction it takes, the last one stopping exactly there.
    assert round_sparsities(0.2, sparsity=0.488) == pytest.approx([0.2, 0.36, 0.488])
    nine = round_sparsities(0.2, sparsity=0.9)
    assert len(nine) == math.ceil(math.log(0.1) / math.log(0.8)) == 11
    assert nine[-1] == 0.9 and nine[:-1] == pytest.approx([1 - 0.8**r for r in range(1, 11)])
    for bad in ({"rounds": 0}, {"rounds": 2.5}, {"sparsity": 1.0}, {}, {"rounds": 2, "prune_fraction": 1.0}):
        with pytest.raises(BudgetError):
            round_sparsities(**{"prune_fraction": 0.2, **bad})


def test_imp_plans_are_exact_and_only_shrink_on_resnet20():
    model = create("resnet20")
    method = IMP(rounds=3, sparsity=0.488)
    total = sum(w.numel() for _, w in prunable_weights(model))
    masks = None
    previous = None
    gen = torch.Generator().manual_seed(0)
    for r, target in enumerate([0.2, 0.36, 0.488], start=1):
        ctx = MethodContext(
            budget={},
            data=None,
            input_shape=(3, 32, 32),
            num_classes=10,
            seed=0,
            run_dir=Path("."),
            round=r,
            masks=masks,
        )
        plan = method.plan(model, ctx)
        # Exact to one weight of the 0.27M: within 1e-4 of the target, as open_lth's tests ask.
        assert abs(plan.sparsity() - target) <= 0.5 / total and abs(plan.sparsity() - target) < 1e-4
        if previous is not None:
            assert all(not (plan.masks[n] & ~previous.masks[n]).any() for n in plan.masks)
        # "Training" between rounds moves the weights, pruned ones included (they are zeroed below).
        with torch.no_grad():
            for name, w in prunable_weights(model):
                w.add_(torch.randn(w.shape, generator=gen) * w.std())
                w.mul_(plan.masks[name])
        previous = masks = plan


def test_imp_rounds_end_to_end(tmp_path):
    summary = _imp(tmp_path, "trainer.max_epochs=1")
    stages = json.loads((tmp_path / "stages.json").read_text())
    dirs = [s["dir"] for s in stages]
    assert dirs[:2] == ["r0-0-train", "r0-1-test"]
    assert dirs[2:11] == [f"r{r}-{i}-{n}" for r in (1, 2, 3) for i, n in enumerate(["prune", "rewind", "test"])]
    assert dirs[-1] == "11-test"
    assert all((tmp_path / "stages" / d / "done.json").exists() for d in dirs)

    total = sum(w.numel() for _, w in prunable_weights(create("resnet_tiny")))
    masks = _round_masks(tmp_path)
    for r, (target, plan) in enumerate(zip([0.2, 0.36, 0.488], masks), start=1):
        assert summary[f"round{r}/sparsity"] == plan.sparsity()
        assert abs(plan.sparsity() - target) <= 0.5 / total + 1e-12
        assert 0.0 <= summary[f"round{r}/test/acc"] <= 100.0
        assert (
            json.loads((tmp_path / "stages" / f"r{r}-0-prune" / "plan.json").read_text())["sparsity"] == plan.sparsity()
        )
        assert summary[f"round{r}/rewind/steps"] == STEPS_PER_EPOCH
    assert summary["round0/sparsity"] == 0.0 and "round0/test/acc" in summary
    # Masks only shrink: a weight pruned in round r stays pruned.
    for before, after in itertools.pairwise(masks):
        assert all(not (after.masks[n] & ~before.masks[n]).any() for n in after.masks)
    # The final model carries the last round's mask exactly, and the test ran on it.
    final = load_model(tmp_path / "model.pt")
    for name, w in prunable_weights(final):
        assert not (w[~masks[-1].masks[name]] != 0).any(), name
    assert summary["model/sparsity"] == pytest.approx(0.488, abs=1e-4)
    assert summary["test/acc"] == summary["round3/test/acc"]


class _Snapshots(L.Callback):
    """The model's tensors at the start of round 0's training, at step `k` of it, and when round 1 trains."""

    def __init__(self, k: int):
        self.k = k
        self.at: dict[str, dict[str, torch.Tensor]] = {}

    def _take(self, pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_fit_start(self, trainer, pl_module):
        if pl_module.stage == "round0/train":
            self.at["init"] = self._take(pl_module)
        if pl_module.stage == "round1/rewind":
            self.at["rewound"] = self._take(pl_module)
            self.at["optimizer_state"] = trainer.optimizers[0].state_dict()["state"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == "round0/train" and trainer.global_step == self.k and "k" not in self.at:
            self.at["k"] = self._take(pl_module)


@pytest.mark.parametrize("k", [0, 3])
def test_rewind_restores_iteration_k_bit_identically_under_the_mask(tmp_path, k):
    snaps = _Snapshots(k)
    _imp(
        tmp_path,
        "trainer.max_epochs=1",
        "method.rounds=1",
        "budget.sparsity=0.5",
        f"retrain.rewind_iteration={k}",
        callbacks=[snaps],
    )
    expected = snaps.at["init" if k == 0 else "k"]
    saved = load_model(tmp_path / "rewind.pt").state_dict()
    assert all(torch.equal(saved[n], t) for n, t in expected.items())
    (mask,) = _round_masks(tmp_path, 1)
    rewound = snaps.at["rewound"]
    for name, tensor in expected.items():
        if name in mask.masks:
            # Under the (attached) mask: kept entries are the snapshot's values, pruned ones exactly zero.
            stored = rewound[name[: -len("weight")] + "parametrizations.weight.original"]
            assert torch.equal(stored, tensor * mask.masks[name]), name
        else:
            assert torch.equal(rewound[name], tensor), name
    # The weights really were rewound (round 0 moved them), and the optimizer starts fresh.
    trained = load_model(tmp_path / "stages" / "r0-0-train" / "model.pt").state_dict()
    assert not torch.equal(trained["conv1.weight"], expected["conv1.weight"])
    assert snaps.at["optimizer_state"] == {}


def test_rewinding_past_the_first_training_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"rewind_iteration=1000 is past the 7 optimizer steps .*round0/train"):
        _imp(
            tmp_path, "trainer.max_epochs=1", "method.rounds=1", "budget.sparsity=0.5", "retrain.rewind_iteration=1000"
        )
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("kill", ["training", "training_with_workers", "pruning", "between_stages"])
def test_killed_in_round_two_resumes_round_two_with_the_same_masks(tmp_path, kill, monkeypatch):
    # Worker processes fetch the first batches' indices as soon as the loader's iterator exists.
    workers = ["dataset.num_workers=2"] if kill == "training_with_workers" else []
    reference = _imp(tmp_path / "ref", "trainer.max_epochs=2", *workers)
    run = tmp_path / "run"
    if kill == "pruning":
        original = IMP.plan

        def crashing(self, model, ctx):
            if ctx.round == 2:
                raise RuntimeError("simulated crash")
            return original(self, model, ctx)

        monkeypatch.setattr(IMP, "plan", crashing)
        crash = []
    else:
        crash = [CrashAtEpoch(0 if kill == "between_stages" else 1, stage="round2/rewind")]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _imp(run, "trainer.max_epochs=2", *workers, callbacks=crash)
    monkeypatch.undo()
    done = sorted(p.parent.name for p in (run / "stages").glob("*/done.json"))
    assert "r1-2-test" in done and "r2-1-rewind" not in done

    recorder = EpochRecorder()
    summary = _imp(run, "trainer.max_epochs=2", *workers, callbacks=[recorder])
    trained = [stage for stage, _ in recorder.stages]
    # Round 0 and round 1 are not trained again; round 2 continues (from epoch 1 when killed in it).
    assert not any(s.startswith(("round0/", "round1/")) for s in trained)
    assert recorder.stages[0] == ("round2/rewind", 1 if kill.startswith("training") else 0)
    for ref, got in zip(_round_masks(tmp_path / "ref"), _round_masks(run)):
        assert all(torch.equal(ref.masks[n], got.masks[n]) for n in ref.masks)
    for key in ("round2/test/acc", "round3/test/acc", "test/acc", "test/loss", "round3/sparsity"):
        assert summary[key] == reference[key], key


class Growing(PruningMethod):
    """A toy method: `value` grows by one per optimizer step in the "grow" stage (state that must
    survive a resume); optionally a stop condition on it, parameter groups and a per-step schedule."""

    def __init__(
        self,
        stop_at: float | None = None,
        max_steps: int | None = None,
        epochs: int | None = 3,
        groups: bool = False,
        one_cycle: bool = False,
    ) -> None:
        self.value = 0.0
        self.stop_at = stop_at
        self.max_steps = max_steps
        self.epochs = epochs
        self.groups = groups
        self.one_cycle = one_cycle
        self._growing = False

    def stages(self):
        scheduler = None
        if self.one_cycle:
            scheduler = {
                "_target_": "torch.optim.lr_scheduler.OneCycleLR",
                "_partial_": True,
                "max_lr": 0.1,
                "interval": "step",
            }
        return [
            Stage("grow", "fit", epochs=self.epochs, max_steps=self.max_steps, scheduler=scheduler),
            Stage("hold", "fit", epochs=2),
        ]

    def setup(self, model, stage, ctx):
        self._growing = stage.name == "grow"
        return model

    def after_optimizer_step(self, model, step):
        if self._growing:
            self.value += 1.0

    def should_stop(self, model, step):
        if self._growing and self.stop_at is not None and self.value >= self.stop_at:
            return f"value reached {self.stop_at:g}"
        return None

    def parameters_to_train(self, model):
        if not self.groups:
            return model.parameters()
        norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
        ids = {id(p) for p in norms}
        return [
            {"params": norms, "weight_decay": 0.0, "lr": 0.01},
            {"params": [p for p in model.parameters() if id(p) not in ids]},
        ]

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


class _Watch(L.Callback):
    """Records the method's value at the end of every fit, the optimizer's groups and the lr per step."""

    def __init__(self):
        self.values: dict[str, float] = {}
        self.groups: list[dict] = []
        self.lrs: list[float] = []
        self.total_steps: int | None = None

    def on_train_start(self, trainer, pl_module):
        if pl_module.stage == "grow":
            self.groups = [
                {k: v for k, v in g.items() if k != "params"} | {"size": len(g["params"])}
                for g in trainer.optimizers[0].param_groups
            ]
            scheduler = trainer.lr_scheduler_configs[0]
            self.total_steps = getattr(scheduler.scheduler, "total_steps", None)
            self.interval = scheduler.interval

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == "grow":
            self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    def on_fit_end(self, trainer, pl_module):
        self.values[pl_module.stage] = pl_module.method.value


def _toy(tmp_path, *overrides, callbacks=None):
    cfg = make_cfg(tmp_path, "method._target_=test_iterative.Growing", *QUIET, *overrides)
    return pipeline.run(cfg, tmp_path, callbacks=callbacks)


def test_method_state_survives_a_resume_mid_stage_and_between_stages(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _toy(tmp_path, callbacks=[CrashAtEpoch(2, stage="grow")])
    saved = torch.load(tmp_path / "stages" / "0-grow" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["prunelab_method"] == {"value": 2.0 * STEPS_PER_EPOCH}
    watch = _Watch()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _toy(tmp_path, callbacks=[watch, CrashAtEpoch(1, stage="hold")])
    # The fresh method object went on from the checkpoint's value, not from zero.
    assert watch.values["grow"] == 3.0 * STEPS_PER_EPOCH
    assert torch.load(tmp_path / "stages" / "0-grow" / "method.pt", weights_only=True) == {"value": 21.0}
    # Resumed in the next stage, the method gets the state the completed stage left.
    watch = _Watch()
    _toy(tmp_path, callbacks=[watch])
    assert watch.values == {"hold": 3.0 * STEPS_PER_EPOCH}


def test_stop_condition_ends_the_stage_and_is_recorded(tmp_path):
    summary = _toy(tmp_path / "a", "+method.stop_at=5", "+method.epochs=-1", "+method.max_steps=100")
    assert summary["grow/steps"] == 5 and summary["grow/end"] == "condition: value reached 5"
    assert summary["hold/end"] == "max_epochs" and summary["hold/steps"] == 2 * STEPS_PER_EPOCH
    # The step limit is the safety net when the condition never comes.
    summary = _toy(tmp_path / "b", "+method.stop_at=50", "+method.epochs=-1", "+method.max_steps=3")
    assert summary["grow/steps"] == 3 and summary["grow/end"] == "max_steps"
    with pytest.raises(ValueError, match="needs max_steps"):
        _toy(tmp_path / "c", "+method.epochs=-1")


class _CrashAtFitEnd(L.Callback):
    """Simulates a kill after a stage's training ended (its checkpoint written), before it is marked done."""

    def on_fit_end(self, trainer, pl_module):
        if pl_module.stage == "grow":
            raise RuntimeError("simulated crash")


def test_a_stage_killed_after_its_stop_condition_ends_where_it_ended(tmp_path):
    args = ["+method.stop_at=5", "+method.epochs=-1", "+method.max_steps=100", "checkpoint_every_n_steps=1"]
    reference = _toy(tmp_path / "ref", *args)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _toy(tmp_path / "run", *args, callbacks=[_CrashAtFitEnd()])
    watch = _Watch()
    resumed = _toy(tmp_path / "run", *args, callbacks=[watch])
    # The condition held when the checkpoint was written: no step more (the value would reach 6).
    assert watch.values["grow"] == 5.0 and resumed["grow/steps"] == 5
    assert resumed["grow/end"] == "condition: value reached 5"
    assert {k: v for k, v in resumed.items() if not k.startswith("time/")} == {
        k: v for k, v in reference.items() if not k.startswith("time/")
    }


def test_parameter_groups_reach_the_optimizer_with_their_own_settings(tmp_path):
    watch = _Watch()
    _toy(tmp_path, "+method.groups=true", "+method.epochs=1", "optimizer.lr=0.1", callbacks=[watch])
    norms, rest = watch.groups
    model = create("resnet_tiny")
    bn = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d)) * 2
    assert norms["size"] == bn and norms["weight_decay"] == 0.0 and norms["lr"] == 0.01
    assert rest["size"] == len(list(model.parameters())) - bn and rest["weight_decay"] == 5e-4 and rest["lr"] == 0.1
    assert watch.interval == "epoch"


def test_a_per_step_scheduler_gets_the_stage_steps(tmp_path):
    watch = _Watch()
    _toy(tmp_path, "+method.one_cycle=true", "+method.epochs=2", callbacks=[watch])
    # OneCycleLR got the stage's optimizer steps and is stepped after every one of them.
    assert watch.interval == "step" and watch.total_steps == 2 * STEPS_PER_EPOCH
    assert len(set(watch.lrs)) == len(watch.lrs) == 2 * STEPS_PER_EPOCH
    assert max(watch.lrs) <= 0.1 and watch.lrs[0] < watch.lrs[len(watch.lrs) // 3]


# method=control needs a finished run to control (method.source): tests/test_control.py runs it on one.
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml") if p.stem != "control")


def test_every_method_has_a_test_here():
    assert {
        "dense",
        "imp",
        "jackpot",
        "edge_popup",
        "pfs",
        "l1_filter",
        "magnitude",
        "random",
        "slimming",
        "uniform",
        "greg1",
        "greg2",
        "concave",
        "cs",
        "greedy",
    } <= set(METHODS)


# One training batch does not bound greedy's layer-by-layer imitation and epsilon search (over 4 minutes on a loaded
# 2-core machine; test_greedy.py checks its results): `make test-slow`.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "greedy" else m for m in METHODS])
def test_every_method_config_runs_through_a_one_batch_pipeline(tmp_path, method):
    summary = pipeline.run(
        make_cfg(
            tmp_path,
            f"method={method}",
            "budget.flops=0.5",
            "budget.sparsity=0.5",
            "budget.tolerance=0.3",
            "trainer.limit_train_batches=1",
            "trainer.limit_test_batches=1",
            "retrain.epochs=1",
            *QUIET,
            *FEW_STEPS.get(method, []),
        ),
        tmp_path,
    )
    assert 0.0 <= summary["test/acc"] <= 100.0
    model = load_model(tmp_path / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == summary["model/params"]
    if method not in ("dense",):
        pruned = summary["model/flops_ratio"] < 1.0 or summary["model/sparsity"] > 0.4
        assert pruned, summary


@pytest.mark.parametrize("arch", ["resnet20", "vgg11", "wrn20"])
@pytest.mark.parametrize("data", ["cifar10", "cifar100", "tiny_imagenet"])
def test_imp_presets_follow_the_concave_papers_protocol(arch, data):
    cfg = preset(f"imp_{arch}_{data}")
    epochs, milestones = (85, [56, 71]) if arch == "resnet20" else (120, [60, 90])
    assert cfg.dataset._target_.endswith(
        {"cifar10": "CIFAR10DataModule", "cifar100": "CIFAR100DataModule", "tiny_imagenet": "TinyImageNetDataModule"}[
            data
        ]
    )
    assert (cfg.dataset.batch_size, cfg.dataset.val_size, cfg.trainer.max_epochs) == (128, 0, epochs)
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        "torch.optim.SGD",
        0.1,
        0.9,
        1e-4,
    )
    assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma) == (milestones, 0.1)
    assert (cfg.retrain.mode, cfg.retrain.rewind_iteration) == ("rewind", 0)
    method = instantiate(cfg.method)
    assert method.targets == pytest.approx([0.2, 0.36, 0.488]) and method.scope == "global"
    # open_lth keeps VGG's output layer dense and prunes the ResNets' (the WRN-20 is a wide ResNet-20).
    assert method.dense_output == (arch == "vgg11")
    model = instantiate(cfg.backbone, num_classes=10, in_channels=3)
    if arch != "vgg11":
        assert model.conv1.out_channels == (64 if arch == "wrn20" else 16)
        assert isinstance(model.layer2[0].shortcut, nn.Sequential)
