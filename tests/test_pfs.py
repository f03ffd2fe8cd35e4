"""Pruning from Scratch: frozen weights and buffers, gradients on gates only, gate placement, the loss,
the choice of gates, the FLOPs budget measured on the exported model, resume, and the presets."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import make_cfg, preset
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from prunelab import load_model, pipeline, report, save_model
from prunelab.backbones import create
from prunelab.budget import count_flops, search_threshold
from prunelab.methods.base import Stage
from prunelab.methods.pfs import ChannelGates, PruningFromScratch, rank_scores
from prunelab.structure import channel_groups

SHAPE = (3, 32, 32)
SEARCH = Stage("search", "fit")
TOLERANCE = 0.02
# One small end-to-end run shared by several tests: resnet_tiny on synthetic data, two search epochs.
# The large gate learning rate and r = 0.75 let gates reach zero within these 14 steps, so the first
# validation check is not admissible (density 0.79) and the second is (0.70).
RUN = [
    "method=pfs",
    "method.epochs=2",
    "method.lr=0.2",
    "method.ratio=0.75",
    "budget.flops=0.5",
    f"budget.tolerance={TOLERANCE}",
    "retrain=scratch_b",
    "retrain.epochs=1",
    "latency.batch_sizes=[]",
]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors (weights and buffers) by their plain names; the gates are the method's, not the model's.

    During the search a gated BatchNorm's weight and bias are parametrized (the gate folded in): their
    originals are `<bn>.parametrizations.weight.original`.
    """
    plain = lambda k: k.replace("parametrizations.", "").replace(".original", "")  # noqa: E731
    return {plain(k): v.detach().clone() for k, v in model.state_dict().items()}


def _stage_dir(run_dir, name):
    (found,) = run_dir.glob(f"stages/*-{name}")
    return found


def _expanded(name: str = "resnet_tiny", **kwargs) -> nn.Module:
    method = PruningFromScratch(ratio=0.5, **kwargs)
    model = method.initial_model(create(name))
    model.prunelab.input_shape = SHAPE
    return model


class _SearchRecorder(L.Callback):
    """Records the model's tensors when the search starts and ends, and which parameters got gradients."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.gates_after: torch.Tensor | None = None
        self.with_grad: list[set[str]] = []
        self.trainable: set[str] = set()

    def on_fit_start(self, trainer, pl_module):
        if pl_module.stage == "search":
            self.before = _state(pl_module.model)
            self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_after_backward(self, trainer, pl_module):
        if pl_module.stage == "search":
            self.with_grad.append({n for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_fit_end(self, trainer, pl_module):
        if pl_module.stage == "search":
            self.after = _state(pl_module.model)
            self.gates_after = pl_module.method_module.flat().detach().clone()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One PFS run through the pipeline."""
    run_dir = tmp_path_factory.mktemp("pfs")
    recorder = _SearchRecorder()
    cfg = make_cfg(run_dir, *RUN)
    summary = pipeline.run(cfg, run_dir, callbacks=[recorder])
    return SimpleNamespace(dir=run_dir, cfg=cfg, summary=summary, recorder=recorder)


def test_search_leaves_weights_and_bn_buffers_bit_identical(run):
    rec = run.recorder
    assert rec.before and rec.after
    weights = {n for n, _ in create("resnet_tiny").named_parameters()}
    # The weights never change during the search (nothing is restored for them).
    for name in weights:
        assert torch.equal(rec.before[name], rec.after[name]), name
    # BatchNorm runs in training mode, as in the official code: its running statistics move ...
    moved = [n for n in rec.before if n.endswith("running_mean") and not torch.equal(rec.before[n], rec.after[n])]
    assert moved
    # ... and are put back when the search ends, so its output is bit-identical to its input.
    searched = load_model(_stage_dir(run.dir, "search") / "model.pt")
    out = searched.state_dict()
    assert set(out) == set(rec.before)
    for name, tensor in rec.before.items():
        assert torch.equal(out[name], tensor), name
    assert all(p.requires_grad for p in searched.parameters())
    # The gates themselves did train.
    assert rec.gates_after is not None and float((rec.gates_after - 1).abs().max()) > 1e-3


def test_only_gates_receive_gradients(run):
    rec = run.recorder
    gate_names = set(rec.trainable)
    assert gate_names and all(n.startswith("method_module.gates.") for n in gate_names)
    # Two epochs of 7 batches each (224 training images, batch 32).
    assert len(rec.with_grad) == 14
    assert all(step == gate_names for step in rec.with_grad)


class _ConvBackwardMasks(TorchDispatchMode):
    """Records which gradients (input, weight, bias) each convolution backward computes."""

    def __init__(self):
        super().__init__()
        self.masks: list[tuple[bool, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(bool(m) for m in args[-1]))
        return func(*args, **(kwargs or {}))


def _backward_masks(model: nn.Module) -> list[tuple[bool, ...]]:
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    with _ConvBackwardMasks() as mode:
        loss.backward()
    return mode.masks


def test_search_backward_computes_no_weight_gradient():
    model = _expanded().train()
    dense_masks = _backward_masks(model)
    assert dense_masks and all(m[1] for m in dense_masks)
    model.zero_grad(set_to_none=True)

    method = PruningFromScratch(ratio=0.5)
    method.setup(model, SEARCH, None)
    masks = _backward_masks(model)
    # Every convolution after the first gate passes a gradient to its input, none to its weight; the
    # first convolution, before any gate, is not differentiated at all.
    assert len(masks) == len(dense_masks) - 1
    assert all(m[0] and not m[1] for m in masks)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in method.parameters_to_train(model))


def test_pruned_model_meets_flops_budget_on_exported_model(run):
    dense = count_flops(create("resnet_tiny"), SHAPE)
    assert run.summary["dense/flops"] == dense
    exported = load_model(run.dir / "model.pt")
    measured = count_flops(exported, SHAPE) / dense
    assert abs(measured - 0.5) / 0.5 <= TOLERANCE
    assert run.summary["model/flops_ratio"] == pytest.approx(measured)
    # The pruned model is cut from the x1.25 network: its widest layer keeps up to 80 of 64 x 1.25.
    assert exported.prunelab.spec["width"] == 1.25
    # Scratch-B scaled the one base epoch by dense / pruned FLOPs.
    assert run.summary["scratch_b/epochs"] == round(1 / measured)


def test_gates_are_kept_from_the_best_admissible_validation_check(run):
    record = json.loads((run.dir / "pfs_gates.json").read_text())
    history, selection = record["history"], record["selection"]
    assert [h["check"] for h in history] == [1, 2] and selection["checks"] == 2
    admissible = [h for h in history if h["density"] <= record["ratio"]]
    assert 0 < len(admissible) < len(history)
    best = max(admissible, key=lambda h: h["acc"])
    assert selection["check"] == best["check"] and selection["val_acc"] == best["acc"]
    assert selection["density"] == best["density"] <= 0.75
    # The plan keeps, in the gated groups, exactly the counts recorded beside the gates.
    plan = json.loads((_stage_dir(run.dir, "prune") / "plan.json").read_text())
    assert {k: len(v) for k, v in plan["keep"].items()} == record["kept"]
    assert set(record["gates"]) == set(plan["keep"])


def test_selection_rule_prefers_best_accuracy_below_target_density():
    gates = ChannelGates({"a": 4, "b": 4})
    # Density 1 is above r = 0.5: not admissible however accurate.
    assert not gates.record(90.0, ratio=0.5)["kept"]
    with torch.no_grad():
        gates.gates[0].copy_(torch.tensor([0.0, 0.0, 0.3, 0.9]))
        gates.gates[1].copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert gates.record(60.0, ratio=0.5)["kept"]
    with torch.no_grad():
        gates.gates[1][:2] = 0.2
    assert not gates.record(80.0, ratio=0.5)["kept"]  # density 5/8 > r
    with torch.no_grad():
        gates.gates[1][:2] = 0.0
        gates.gates[0][3] = 0.7
    assert not gates.record(55.0, ratio=0.5)["kept"]  # admissible but less accurate than check 2
    selected, info = gates.selection()
    assert info["check"] == 2 and info["val_acc"] == 60.0 and info["density"] == 0.375
    assert torch.equal(selected["a"], torch.tensor([0.0, 0.0, 0.3, 0.9]))

    # With no admissible check, the final gates are used, as in the official code.
    fresh = ChannelGates({"a": 2})
    fresh.record(50.0, ratio=0.5)
    selected, info = fresh.selection()
    assert info["check"] is None and info["source"].startswith("final gates")
    assert torch.equal(selected["a"], torch.ones(2))


def test_loss_term_and_clamp():
    model = _expanded()
    method = PruningFromScratch(ratio=0.3, gamma=0.5)
    assert method.extra_loss(model) is None
    method.setup(model, SEARCH, None)
    gates = method.state_module()
    with torch.no_grad():
        for gate in gates.gates:
            gate.fill_(0.6)
        gates.gates[0][0] = -0.4
    total = sum(g.numel() for g in gates.gates)
    l1_mean = (0.6 * (total - 1) + 0.4) / total
    assert float(method.extra_loss(model).detach()) == pytest.approx(0.5 * (l1_mean - 0.3) ** 2, rel=1e-6)
    with torch.no_grad():
        gates.gates[1][0] = 1.7
    method.after_optimizer_step(model, 1)
    assert gates.gates[0][0].item() == 0.0 and gates.gates[1][0].item() == 1.0
    method.teardown(model, SEARCH)
    assert method.extra_loss(model) is None and method.state_module() is None


class _Products(TorchDispatchMode):
    """Records the output shape of every elementwise product."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def test_gates_cost_no_activation_sized_product():
    # The gates are folded into the BatchNorms' weight and bias: forward and backward multiply
    # channel vectors only, never a (batch, channels, h, w) activation.
    model = _expanded().train()
    method = PruningFromScratch(ratio=0.5)
    method.setup(model, SEARCH, None)
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    with _Products() as products:
        (nn.functional.cross_entropy(model(x), y) + method.extra_loss(model)).backward()
    assert products.shapes and all(len(shape) <= 1 for shape in products.shapes), products.shapes
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in method.parameters_to_train(model))
    # And the model is plain again afterwards: same parameter names, nothing parametrized.
    names = {n for n, _ in create("resnet_tiny", width=1.25).named_parameters()}
    method.teardown(model, SEARCH)
    assert {n for n, _ in model.named_parameters()} == names


def test_gate_follows_batchnorm_and_is_shared_across_a_residual_stream():
    model = _expanded().eval()
    reference = copy.deepcopy(model)
    groups = {g.name: g for g in channel_groups(model, SHAPE)}
    method = PruningFromScratch(ratio=0.5)
    method.setup(model, SEARCH, None)
    stream = next(g for g in groups.values() if g.coupled)
    inner = groups["layer1.0.conv1"]
    assert stream.norms == ["bn1", "layer1.0.bn2"] and inner.norms == ["layer1.0.bn1"]
    gates = method.state_module()
    outputs = {}
    for name in stream.norms + inner.norms:
        for net in (model, reference):
            net.get_submodule(name).register_forward_hook(
                lambda m, i, o, key=(net is model, name): outputs.__setitem__(key, o)
            )
    x = torch.randn(2, *SHAPE)

    def forward() -> None:
        with torch.no_grad():
            model(x)
            reference(x)

    # An inner gate scales its BatchNorm's output channel and nothing before it.
    with torch.no_grad():
        gates.gates[gates.names.index(inner.name)][5] = 0.25
    forward()
    assert torch.equal(outputs[True, "bn1"], outputs[False, "bn1"])
    gated, plain = outputs[True, "layer1.0.bn1"], outputs[False, "layer1.0.bn1"]
    assert torch.allclose(gated[:, 5], 0.25 * plain[:, 5]) and torch.equal(gated[:, 4], plain[:, 4])
    # One gate vector serves every BatchNorm of the residual stream: channel 3 is off in all of them.
    with torch.no_grad():
        gates.gates[gates.names.index(stream.name)][3] = 0.0
    forward()
    for name in stream.norms:
        assert torch.all(outputs[True, name][:, 3] == 0) and torch.any(outputs[True, name][:, 4] != 0)


def test_residual_stream_left_alone_without_prune_coupled_and_depthwise_not_gated_twice():
    # In a ResNet-20 every residual stream is written by several blocks: only inner channels are gated.
    method = PruningFromScratch(ratio=0.5, prune_coupled=False)
    gated = method.gated_groups(_expanded("resnet20"))
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert [g.name for g, _ in gated] == inner
    assert [points for _, points in gated] == [[name.replace("conv1", "bn1")] for name in inner]

    mobilenet = _expanded("mobilenet_v2_tiny")
    depthwise = {n for n, m in mobilenet.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    for group, points in PruningFromScratch(ratio=0.5).gated_groups(mobilenet):
        assert len(points) == sum(layer not in depthwise for layer in group.layers)


def test_initial_model_is_wider_fresh_and_loads_init_from(tmp_path):
    dense = create("resnet_tiny")
    model = PruningFromScratch(ratio=0.5, expansion=1.25).initial_model(dense)
    # Block inputs and outputs grow together, so the residual additions still match.
    assert [model.conv1.out_channels, model.layer1[0].conv2.out_channels, model.layer3[0].conv2.out_channels] == [
        20,
        20,
        80,
    ]
    assert model.layer2[0].conv1.in_channels == 20 and model.linear.in_features == 80
    assert count_flops(model, SHAPE) > 1.5 * count_flops(dense, SHAPE)

    trained = create("resnet_tiny", width=1.25)
    with torch.no_grad():
        trained.layer1[0].conv1.weight.fill_(0.125)
    save_model(trained, tmp_path / "checkpoint.pt")
    loaded = PruningFromScratch(ratio=0.5, init_from=str(tmp_path / "checkpoint.pt")).initial_model(dense)
    assert torch.equal(loaded.state_dict()["layer1.0.conv1.weight"], trained.state_dict()["layer1.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"width 1.5"):
        PruningFromScratch(ratio=0.5, expansion=1.5, init_from=str(tmp_path / "checkpoint.pt")).initial_model(dense)


def test_rank_scores_split_ties_so_a_budget_needing_zero_gates_is_met():
    model = _expanded("vgg_tiny")
    groups = channel_groups(model, SHAPE)
    # Most gates are exactly zero after the clamp; the budget needs some of those channels.
    gates = {g.name: torch.zeros(g.size) for g in groups}
    gates[groups[0].name][:2] = torch.tensor([0.9, 0.4])
    scores = rank_scores(gates, seed=0)
    flat = torch.cat(list(scores.values()))
    total = flat.numel()
    assert torch.equal(flat.sort().values, torch.arange(1, total + 1) / total)
    assert float(scores[groups[0].name][0]) == 1.0
    assert float(scores[groups[0].name][1]) == pytest.approx((total - 1) / total)
    dense = count_flops(create("vgg_tiny"), SHAPE)
    # Gate thresholds alone could keep only the two non-zero channels (and one per other group).
    plan, ratio = search_threshold(model, scores, 0.5, SHAPE, tolerance=0.05, reference=dense)
    assert abs(ratio - 0.5) / 0.5 <= 0.05
    assert 0 in plan.keep[groups[0].name] and 1 in plan.keep[groups[0].name]


def test_resume_after_search_reuses_its_gates(run, tmp_path):
    shutil.copytree(run.dir, tmp_path, dirs_exist_ok=True)
    first = json.loads((_stage_dir(tmp_path, "prune") / "plan.json").read_text())
    # A run killed between the search and the prune stage: the new process must find the gates again.
    (_stage_dir(tmp_path, "prune") / "done.json").unlink()
    (tmp_path / "summary.json").unlink()
    summary = pipeline.run(make_cfg(tmp_path, *RUN), tmp_path)
    again = json.loads((_stage_dir(tmp_path, "prune") / "plan.json").read_text())
    assert again["keep"] == first["keep"]
    record = json.loads((tmp_path / "pfs_gates.json").read_text())
    assert record["selection"] == json.loads((run.dir / "pfs_gates.json").read_text())["selection"]
    assert summary["model/flops"] == run.summary["model/flops"]


def test_search_stage_schedule_and_cifar_presets(tmp_path):
    method = instantiate(make_cfg(tmp_path, "method=pfs", "budget.flops=0.4").method)
    assert (method.ratio, method.gamma, method.epochs, method.expansion) == (0.4, 0.5, 10, 1.25)
    search, prune = method.stages()
    assert (search.kind, search.epochs, prune.kind) == ("fit", 10, "prune")
    optimizer = instantiate(search.optimizer)([nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.01
    assert search.scheduler._target_ == "prunelab.lit.constant"

    for name, coupled in (("vgg16", True), ("resnet20", False), ("resnet56", False), ("resnet110", False)):
        cfg = preset(f"pfs_{name}_cifar10")
        assert cfg.backbone.name == name and cfg.dataset._target_.endswith("CIFAR10DataModule")
        assert (cfg.budget.flops, cfg.budget.prune_coupled, cfg.retrain.mode) == (0.5, coupled, "scratch_b")
        assert (cfg.dataset.batch_size, cfg.dataset.val_size, cfg.trainer.max_epochs) == (128, 5000, 160)
        assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.scheduler.milestones) == (0.1, 1e-4, [0.5, 0.75])
        # The official code retrains on all 50,000 training images, validation images included.
        assert cfg.retrain.with_val is True
        pfs = instantiate(cfg.method)
        assert (pfs.ratio, pfs.gamma, pfs.lr, pfs.epochs, pfs.expansion, pfs.prune_coupled) == (
            0.5, 0.5, 0.01, 10, 1.25, coupled,
        )  # fmt: skip
    quick = preset("pfs_resnet20_digits_quick")
    assert quick.dataset._target_.endswith("DigitsDataModule") and quick.retrain.mode == "scratch_b"
    assert OmegaConf.select(quick, "method._target_") == "prunelab.methods.pfs.PruningFromScratch"


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "resnet56", "resnet110"])
def test_official_backbone_presets_differ_from_ours_only_in_the_backbone(name):
    ours, official = preset(f"pfs_{name}_cifar10"), preset(f"pfs_{name}_cifar10_official")
    changed = {"bn_weight": 0.5} if name == "vgg16" else {"shortcut": "B", "init": "pfs_official"}
    assert {key: official.backbone[key] for key in changed} == changed
    assert {key: ours.backbone[key] for key in changed} == ({"bn_weight": 1.0} if name == "vgg16" else {
        "shortcut": "A", "init": "reference"
    })  # fmt: skip
    ours, official = OmegaConf.to_container(ours), OmegaConf.to_container(official)
    for key in changed:
        del ours["backbone"][key], official["backbone"][key]
    assert official == ours and official["retrain"]["with_val"] is True


def test_search_starts_from_the_official_backbone_choices():
    dense = create("resnet_tiny", shortcut="B", init="pfs_official")
    model = PruningFromScratch(ratio=0.5, expansion=1.25).initial_model(dense)
    # The widened search backbone is built from the same spec: option-B shortcuts, fan_out convolutions.
    assert model.prunelab.spec["init"] == "pfs_official" and isinstance(model.layer2[0].shortcut, nn.Sequential)
    std = model.layer3[0].conv1.weight.std().item()
    assert std == pytest.approx((2 / (9 * 80)) ** 0.5, rel=0.05)
    vgg = PruningFromScratch(ratio=0.5).initial_model(create("vgg_tiny", bn_weight=0.5))
    bn = [m.weight for m in vgg.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in bn)


def test_report_reads_structures_from_run_directories(run, tmp_path):
    (found,) = report.find_runs([run.dir])
    assert found.path == run.dir and found.label(["method._target_", "seed"]) == "method=PruningFromScratch seed=0"
    plan = json.loads((_stage_dir(run.dir, "prune") / "plan.json").read_text())
    ratios = report.keep_ratios(found)
    assert ratios == {name: len(keep) / plan["sizes"][name] for name, keep in plan["keep"].items()}
    matrix = report.correlation_matrix([[1, 2, 3], [2, 4, 6], [3, 2, 1]])
    expected = torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]])
    assert torch.allclose(torch.tensor(matrix, dtype=torch.float32), expected)
    assert report.plot_channels([found], out=tmp_path).exists()
    assert report.plot_similarity([found, found], out=tmp_path).exists()
    written = json.loads((tmp_path / "similarity.json").read_text())
    assert torch.allclose(torch.tensor(written["correlation"], dtype=torch.float32), torch.ones(2, 2))
    assert written["keep_ratios"][0] == [ratios[g] for g in written["groups"]]
    cost = report.search_cost(found, found, search_stage="search", dense_stage="scratch_b")
    assert cost["search_epochs"] == 2 and cost["dense_epochs"] == run.summary["scratch_b/epochs"]
    assert cost["search_epoch_s"] == pytest.approx(run.summary["time/search_s"] / 2)


def test_imagenet_presets_validate_inside_the_search_epoch(tmp_path):
    for name, retrain in (("mobilenet_v1", "scratch"), ("mobilenet_v2", "scratch"), ("resnet50", "scratch_b")):
        cfg = preset(f"pfs_{name}_imagenet")
        assert cfg.backbone.name == name and cfg.dataset._target_.endswith("ImageNetDataModule")
        assert (cfg.method.gamma, cfg.method.epochs, cfg.retrain.mode, cfg.label_smoothing) == (0.05, 1, retrain, 0.1)
        # The official train_pruned_imagenet.py retrains on the whole training folder.
        assert cfg.retrain.with_val is True
    # val_check_interval reaches the search's Trainer: two checks in each of the two search epochs.
    run_dir = tmp_path / "run"
    pipeline.run(make_cfg(run_dir, *RUN, "method.val_check_interval=0.5", "retrain=none"), run_dir)
    record = json.loads((run_dir / "pfs_gates.json").read_text())
    assert len(record["history"]) == 4
