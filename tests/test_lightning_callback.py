"""A method inside the user's own training: `prunelab.Pruner` in a plain PyTorch loop and the callback
`prunelab.lightning.Pruning` in a LightningModule and Trainer, both written here as a user would write them."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF_DIR
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab.hooks import IN_YOUR_LOOP, loop_method
from prunelab.lightning import Pruning
from prunelab.lit import PruneLitModule
from prunelab.structure import ChannelPlan, MaskPlan
from prunelab.validate import ConfigError


class Net(nn.Module):
    """A user's own small CNN: two convolutions, then a two-layer classifier."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.classifier(x.mean((2, 3)))


class LitNet(L.LightningModule):
    """A user's own LightningModule around the network: cross-entropy and SGD with momentum."""

    def __init__(self, net: nn.Module, lr: float = 0.05, pruning: Pruning | None = None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.pruning = pruning

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        params = self.pruning.parameters() if self.pruning is not None else self.parameters()
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


class Whole(L.LightningModule):
    """A user's LightningModule that is itself the network (layers and forward of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


SHAPE = (3, 8, 8)
LR = 0.05
# GReg-1 on a short schedule: lambda grows by 0.05 every 2 steps and passes tau=0.28 at iteration 10 (its 6th
# update); 3 stabilisation steps follow: the method's training is over after 13 steps.
GREG = ["method.update_interval=2", "method.delta_lambda=0.05", "method.tau=0.28", "method.stabilize_steps=3"]


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def data(batches: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *SHAPE, generator=generator), torch.randint(0, 4, (8,), generator=generator))
        for _ in range(batches)
    ]


def loader(batches: list) -> DataLoader:
    return DataLoader(
        TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])), batch_size=8
    )


def trainer(**kwargs) -> L.Trainer:
    quiet = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**quiet, **kwargs})


def train(
    pruner: prunelab.Pruner, batches: list, optimizer: torch.optim.Optimizer, accumulate: int = 1
) -> list[str | None]:
    """The user's plain loop with the method's hooks; the reasons after_step gave, one per optimizer step."""
    pruner.model.train()
    reasons = []
    for index, (x, y) in enumerate(batches):
        loss = (F.cross_entropy(pruner.model(x), y) + pruner.extra_loss()) / accumulate
        loss.backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            reasons.append(pruner.after_step())
    return reasons


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_hooks_in_a_plain_loop_equal_the_penalty_written_out_and_prunelabs_own_module(tmp_path):
    batches = data(8)
    # GReg-1 per layer (the paper's setting): half the filters of each convolution, those of least L1 norm.
    settings = dict(
        method="greg1", budget={"layer_ratios": [0.5, 0.5, 0]}, example_inputs=batches[0][0], overrides=GREG
    )
    users = net()
    pruner = prunelab.Pruner(users, **settings, run_dir=tmp_path / "hooks")
    # The method trains the user's model itself, not a copy.
    assert pruner.model is users
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    train(pruner, batches, optimizer)
    hooked = weights(pruner.model)

    # The same loop with GReg-1's penalty written out: lambda = 0.05 (1 + k // 2) at step k on the picked filters.
    model = net()
    picked = {}
    for name in ("conv1", "conv2"):
        w = model.get_submodule(name).weight.detach()
        picked[name] = torch.argsort(w.abs().flatten(1).sum(1))[: w.shape[0] // 2]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for k, (x, y) in enumerate(batches):
        lam = 0.05 * (1 + k // 2)
        penalty = sum(model.get_submodule(n).weight[rows].pow(2).sum() for n, rows in picked.items())
        loss = F.cross_entropy(model(x), y) + 0.5 * lam * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Bit for bit: the hooks compute the same penalty and the same schedule.
    assert_same(hooked, weights(model))

    # Without the penalty the weights differ: the hooks did act.
    plain = net()
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        optimizer.step()
    assert not torch.allclose(plain.conv1.weight, hooked["conv1.weight"], atol=1e-4)

    # prunelab's own LightningModule, given the same method (built the same way), the same batches and SGD.
    own = prunelab.Pruner(net(), **settings, run_dir=tmp_path / "own")
    module = PruneLitModule(
        own.model,
        num_classes=4,
        optimizer=functools.partial(torch.optim.SGD, lr=LR, momentum=0.9),
        method=own.method,
        stage="regularize",
    )
    trainer(max_steps=len(batches)).fit(module, loader(batches))
    assert_same(weights(own.model), hooked)
    assert own.method.state_dict() == pruner.method.state_dict()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_in_a_users_trainer_matches_the_plain_loop(accumulate, tmp_path):
    batches = data(8)
    x = batches[0][0]
    pruner = prunelab.Pruner(net(), "greg1", {"flops": 0.5}, x, overrides=GREG, run_dir=tmp_path / "loop")
    train(pruner, batches, torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9), accumulate)
    looped = pruner.prune()

    pruning = Pruning("greg1", {"flops": 0.5}, x, submodule="net", overrides=GREG, run_dir=tmp_path / "callback")
    module = LitNet(net())
    fit = trainer(max_steps=len(batches) // accumulate, accumulate_grad_batches=accumulate, callbacks=[pruning])
    fit.fit(module, loader(batches))

    # The callback added the extra loss's gradient and ran the after-step updates as the loop did:
    # the same weights, then the same plan and the same pruned network. Bit for bit with one batch a step;
    # accumulating, the loop sums (task + extra) per batch and the callback task and extra apart, which
    # rounds differently.
    assert pruning.pruner.steps == pruner.steps == len(batches) // accumulate
    assert pruning.result.plan == looped.plan
    assert module.net is pruning.result.model
    if accumulate == 1:
        assert_same(weights(module.net), weights(looped.model))
    else:
        torch.testing.assert_close(weights(module.net), weights(looped.model), rtol=1e-5, atol=1e-7)


def test_under_mixed_precision_the_extra_gradient_is_scaled_as_the_loss_is(tmp_path):
    batches = data(8)
    x = batches[0][0]
    # The user's loop under float16 autocast with a gradient scaler (on the CPU, as on a GPU).
    pruner = prunelab.Pruner(net(), "greg1", {"flops": 0.5}, x, overrides=GREG, run_dir=tmp_path / "loop")
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    for inputs, labels in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(pruner.model(inputs), labels) + pruner.extra_loss()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pruner.after_step()
    assert scaler.get_scale() > 1.0
    looped = pruner.prune()

    pruning = Pruning("greg1", {"flops": 0.5}, x, submodule="net", overrides=GREG, run_dir=tmp_path / "callback")
    module = LitNet(net())
    amp = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer(max_steps=len(batches), callbacks=[pruning], plugins=[amp]).fit(module, loader(batches))
    assert_same(weights(module.net), weights(looped.model))


def test_the_method_ends_its_training_and_the_pruned_model_meets_the_budget(tmp_path):
    batches = data(4)
    x = batches[0][0]
    pruning = Pruning("greg1", {"flops": 0.5}, x, submodule="net", overrides=GREG, run_dir=tmp_path)
    module = LitNet(net())
    fit = trainer(max_epochs=100, callbacks=[pruning])
    fit.fit(module, loader(batches))

    # GReg-1 ended the fit itself, when lambda had passed tau and K_s steps followed.
    assert fit.global_step == pruning.pruner.method.planned_steps() == 13
    assert pruning.pruner.stop_reason == "lambda passed tau=0.28 at iteration 10, then 3 steps"
    # The channels are gone: within the budget's 1% tolerance of half the FLOPs, and the network runs.
    assert isinstance(pruning.result.plan, ChannelPlan)
    dense = prunelab.count(net(), x)["flops"]
    assert prunelab.count(module.net, x)["flops"] / dense == pytest.approx(0.5, rel=0.01)
    assert pruning.result.report["model/flops_ratio"] == pytest.approx(0.5, rel=0.01)
    assert module.net(x).shape == (8, 4)
    assert (tmp_path / "greg_history.json").exists() and (tmp_path / "prune" / "plan.json").exists()


@pytest.mark.parametrize(("method", "budget"), [("l1_filter", {"flops": 0.5}), ("magnitude", {"sparsity": 0.5})])
def test_a_prune_after_an_epoch_goes_on_training_the_pruned_network_as_a_plain_loop_does(method, budget, tmp_path):
    batches = data(3)
    x = batches[0][0]
    # The loop: an epoch of dense training, the prune, a new optimizer on the pruned network, another epoch.
    pruner = prunelab.Pruner(net(), method, budget, x, run_dir=tmp_path / "loop")
    train(pruner, batches, torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9))
    looped = pruner.prune()
    train(pruner, batches, torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9))

    pruning = Pruning(method, budget, x, submodule="net", prune_at=1, run_dir=tmp_path / "callback")
    module = LitNet(net())
    fit = trainer(max_epochs=2, callbacks=[pruning])
    fit.fit(module, loader(batches))
    assert fit.global_step == 2 * len(batches)
    if method == "magnitude":
        assert pruning.result.plan.masks.keys() == looped.plan.masks.keys()
        assert all(torch.equal(pruning.result.plan.masks[k], m) for k, m in looped.plan.masks.items())
    else:
        assert pruning.result.plan == looped.plan
    # The Trainer's optimizer was built anew on the pruned network, which trained on as the loop's did.
    assert {id(p) for p in fit.optimizers[0].param_groups[0]["params"]} == {id(p) for p in module.net.parameters()}
    assert_same(weights(module.net), weights(pruner.model))
    if method == "magnitude":
        assert prunelab.count(module.net, x)["sparsity"] == pytest.approx(0.5, abs=1e-4)
    else:
        assert prunelab.count(module.net, x)["flops"] / prunelab.count(net(), x)["flops"] == pytest.approx(
            0.5, rel=0.01
        )


def test_the_callback_prunes_a_lightning_module_that_is_the_network_itself(tmp_path):
    batches = data(3)
    x = batches[0][0]
    # Network Slimming's L1 penalty on the BatchNorm scales; this network meets half the FLOPs within 5%.
    settings = dict(
        method="slimming", budget={"flops": 0.5, "tolerance": 0.05}, example_inputs=x, overrides=["method.penalty=0.01"]
    )
    torch.manual_seed(0)
    pruner = prunelab.Pruner(Whole(), **settings, run_dir=tmp_path / "loop")
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    train(pruner, batches + batches, optimizer)
    looped = pruner.prune()

    torch.manual_seed(0)
    module = Whole()
    pruning = Pruning(**settings, run_dir=tmp_path / "callback")
    trainer(max_epochs=2, callbacks=[pruning]).fit(module, loader(batches))
    assert pruning.result.model is module and pruning.result.plan == looped.plan
    assert_same(weights(module), weights(looped.model))
    assert pruning.result.report["model/flops_ratio"] == pytest.approx(0.5, rel=0.05)
    assert module(x).shape == (8, 4)


def test_an_unstructured_prune_keeps_its_zeros_while_the_loop_fine_tunes(tmp_path):
    batches = data(3)
    pruner = prunelab.Pruner(net(), "magnitude", {"sparsity": 0.5}, batches[0][0], run_dir=tmp_path)
    result = pruner.prune()
    assert isinstance(result.plan, MaskPlan) and abs(result.plan.sparsity() - 0.5) < 1e-4
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    train(pruner, batches, optimizer)
    for name, mask in result.plan.masks.items():
        assert not pruner.model.get_parameter(name)[~mask].any(), name
    assert prunelab.count(pruner.model, batches[0][0])["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_a_mask_search_trains_only_its_scores_on_frozen_weights(tmp_path):
    batches = data(6)
    model = net()
    before = weights(model)
    pruner = prunelab.Pruner(
        model,
        "jackpot",
        {"sparsity": 0.5},
        batches[0][0],
        train=loader(batches),
        steps=len(batches),
        overrides=["method.overlap_with=[magnitude]"],
        run_dir=tmp_path,
    )
    optimizer = torch.optim.SGD(pruner.parameters(), lr=0.1, momentum=0.9)
    assert all(p.requires_grad for p in pruner.parameters())
    assert {id(p) for p in pruner.parameters()}.isdisjoint(id(p) for p in before.values())
    train(pruner, batches, optimizer)
    assert sum(sum(r["swaps"]) for r in pruner.method.history) > 0
    result = pruner.prune()
    # The search found an exact-sparsity mask on the untouched weights.
    assert abs(result.plan.sparsity() - 0.5) < 1e-4
    for name, value in weights(result.model).items():
        mask = result.plan.masks.get(name)
        expected = before[name] * mask if mask is not None else before[name]
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, expected), name


def test_one_round_of_continuous_sparsification_with_parameter_groups_and_epoch_hooks(tmp_path):
    batches = data(4)
    pruner = prunelab.Pruner(
        net(),
        "cs",
        {"sparsity": 0.5},
        batches[0][0],
        overrides=["method.rounds=1", "method.lam=1e-3"],
        run_dir=tmp_path,
    )
    # The weights with the optimizer's settings; the relaxed masks in a group of their own, without weight decay.
    groups = pruner.parameters()
    masks = [layer.values for layer in pruner.method._layers.values()]
    assert [len(g["params"]) for g in groups] == [len(list(net().parameters())), len(masks)]
    assert groups[1]["weight_decay"] == 0.0 and all(a is b for a, b in zip(groups[1]["params"], masks))
    optimizer = torch.optim.SGD(groups, lr=LR, momentum=0.9, weight_decay=5e-4)
    epochs = 3
    for epoch in range(epochs):
        pruner.epoch_start(epoch, epochs)
        # beta_t = final_beta^(t / (E - 1)): 1, then sqrt(200), then 200.
        assert all(layer.beta == pytest.approx(200.0 ** (epoch / 2)) for layer in pruner.method._layers.values())
        train(pruner, batches, optimizer)
        pruner.epoch_end(epoch)
    assert pruner.extra_loss() > 0
    result = pruner.prune()
    # The entries whose s ended at or below 0 go; the others stay, with the weights the search left (theta <- m *
    # theta).
    assert isinstance(result.plan, MaskPlan) and 0.0 < result.plan.sparsity() < 1.0
    assert prunelab.count(result.model, batches[0][0])["sparsity"] == pytest.approx(result.plan.sparsity(), abs=1e-4)
    assert not any("parametrizations" in name for name in result.model.state_dict())


def test_the_callback_hands_configure_optimizers_what_a_mask_search_trains(tmp_path):
    batches = data(4)
    x = batches[0][0]
    before = weights(net())
    pruning = Pruning(
        "jackpot",
        {"sparsity": 0.5},
        x,
        submodule="net",
        overrides=["method.overlap_with=[magnitude]"],
        run_dir=tmp_path,
    )
    module = LitNet(net(), lr=0.1, pruning=pruning)
    fit = trainer(max_epochs=2, callbacks=[pruning])
    fit.fit(module, loader(batches))
    # The search's length came from the Trainer (its swap schedule ends at T = 8 steps); only the scores trained.
    assert pruning.pruner.method.total_steps == 8 == len(pruning.pruner.method.history)
    assert abs(pruning.result.plan.sparsity() - 0.5) < 1e-4
    for name, mask in pruning.result.plan.masks.items():
        assert torch.equal(module.net.get_parameter(name), before[name] * mask), name


def test_mistakes_stop_in_one_line_before_any_training(tmp_path):
    x = data(1)[0][0]
    fits = ", ".join(IN_YOUR_LOOP)
    cases = [
        (
            dict(method="imp", budget={"sparsity": 0.5}),
            r"method=imp runs .*round1/prune \(prune\).*round2/prune .*: a loop of yours runs "
            rf"at most one training stage, then one prune \(methods that fit your loop: {fits}\)",
        ),
        (dict(method="concave", budget={"sparsity": 0.5}), r"method=concave runs .*round2/search \(fit\)"),
        (dict(method="pfs", budget={"flops": 0.5}), r"method=pfs starts from a new model of its own"),
        (dict(method="dense"), r"method=dense runs train \(fit\)"),
        (dict(method="greg1", budget={"flop": 0.5}), r"budget key 'flop' is not a budget setting"),
        (dict(method="greg1", budget={"flops": 1.5}), r"budget\.flops=1\.5 is out of range"),
        (dict(method="greg1"), r"GReg1 prunes to a budget: set budget\.flops"),
        (
            dict(method="taylor", budget={"flops": 0.5}),
            r"Taylor scores with training batches, and no training data was given",
        ),
        (
            dict(method="greg1", budget={"flops": 0.5}, overrides=["backbone=resnet20"]),
            r"takes the model and the data from Python",
        ),
    ]
    model = net()
    with pytest.raises(ConfigError, match=r"steps=0 must be a whole number >= 1"):
        prunelab.Pruner(model, "jackpot", {"sparsity": 0.5}, x, steps=0, run_dir=tmp_path)
    assert not any("parametrizations" in name for name in model.state_dict())
    for kwargs, message in cases:
        model = net()
        before = weights(model)
        with pytest.raises(ConfigError, match=message) as caught:
            prunelab.Pruner(model, example_inputs=x, run_dir=tmp_path, **kwargs)
        assert "\n" not in str(caught.value), str(caught.value)
        assert_same(weights(model), before)
        # The callback refuses the same when it is made, before a Trainer exists.
        with pytest.raises(ConfigError, match=message):
            Pruning(example_inputs=x, run_dir=tmp_path, **kwargs)
    # jackpot's default criteria to compare with (snip, grasp) read training batches when the search is set up:
    # the Pruner refuses at once, the callback when the fit is set up, before any step.
    model = net()
    with pytest.raises(ConfigError, match=r"^no training loader was given \(pass train=<DataLoader>\)$"):
        prunelab.Pruner(model, "jackpot", {"sparsity": 0.5}, x, steps=4, run_dir=tmp_path)
    pruning = Pruning("jackpot", {"sparsity": 0.5}, x, submodule="net", run_dir=tmp_path)
    module = LitNet(model)
    fit = trainer(max_steps=4, callbacks=[pruning])
    with pytest.raises(ConfigError, match=r"^no training loader was given"):
        fit.fit(module, loader(data(4)))
    assert fit.global_step == 0 and not any("parametrizations" in name for name in model.state_dict())
    # jackpot's swap schedule spans the whole search: it needs the training's length before the first step.
    pruner = prunelab.Pruner(
        net(), "jackpot", {"sparsity": 0.5}, x, overrides=["method.overlap_with=[]"], run_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"Jackpot schedules its search over the whole training: pass steps="):
        pruner.extra_loss()
    for prune_at in (0, "end", 1.5):
        with pytest.raises(ConfigError, match=r"prune_at=.* must be 'fit_end' or a number of epochs >= 1"):
            Pruning("greg1", {"flops": 0.5}, x, prune_at=prune_at)


def test_the_methods_said_to_fit_a_users_loop_are_those_whose_stages_do(tmp_path):
    names = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    unstructured = {"imp", "concave", "cs", "jackpot", "edge_popup", "magnitude", "snip", "grasp", "synflow", "lamp"}
    unstructured |= {"set", "rigl"}
    train = loader(data(1))
    fitting = []
    for name in names:
        try:
            loop_method(name, {"sparsity": 0.5} if name in unstructured else {"flops": 0.5}, [], tmp_path, train)
        except ConfigError:
            continue
        fitting.append(name)
    assert sorted(IN_YOUR_LOOP) == fitting
    # One round of concave is one search and one prune: it fits.
    assert loop_method("concave", {"sparsity": 0.5}, ["method.rounds=1"], tmp_path)[2].tag == "round1/search"


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_sparse_training_in_a_plain_loop_matches_the_callback_and_resets_new_connections(method, tmp_path):
    # Epochs of 4 steps: SET by default updates after each epoch but the last; RigL every 2 steps while t < 0.75 T.
    batches, epochs = data(4), 3
    x = batches[0][0]
    overrides = ["method.update_every=2"] if method == "rigl" else []
    pruner = prunelab.Pruner(
        net(), method, {"sparsity": 0.5}, x, steps=4 * epochs, overrides=overrides, run_dir=tmp_path / "loop"
    )
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    new_state = []
    for epoch in range(epochs):
        pruner.epoch_start(epoch, epochs)
        for x_, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(pruner.model(x_), y).backward()
            optimizer.step()
            before = pruner.method.masks()
            pruner.after_step(optimizer)
            for name, mask in pruner.method.masks().items():
                new = mask & ~before[name]
                if new.any():
                    new_state.append(optimizer.state[pruner.method._stored[name]]["momentum_buffer"][new])
        pruner.epoch_end(epoch)
    looped = pruner.prune()
    # The connections each update grew start without momentum; the plan meets the sparsity to the weight.
    assert pruner.method.updates == (2 if method == "set" else 4) and new_state
    assert all(not state.any() for state in new_state)
    assert isinstance(looped.plan, MaskPlan) and looped.plan.sparsity() == pytest.approx(0.5, abs=1e-3)

    pruning = Pruning(method, {"sparsity": 0.5}, x, submodule="net", overrides=overrides, run_dir=tmp_path / "callback")
    module = LitNet(net())
    trainer(max_epochs=epochs, callbacks=[pruning]).fit(module, loader(batches))
    assert pruning.pruner.method.state_dict()["history"] == pruner.method.state_dict()["history"]
    assert_same(pruning.result.plan.masks, looped.plan.masks)
    assert_same(weights(module.net), weights(looped.model))

    # Without the optimizer, or (SET's per-epoch schedule) without the epochs, the loop stops before any update.
    pruner = prunelab.Pruner(net(), method, {"sparsity": 0.5}, x, steps=4, overrides=overrides, run_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"resets the optimizer's state .*: call after_step\(optimizer\)$"):
        pruner.after_step()
    if method == "set":
        with pytest.raises(ConfigError, match=r"^set: method.update_every=null updates once per epoch"):
            pruner.after_step(torch.optim.SGD(pruner.parameters(), lr=LR))
    assert pruner.method.updates == 0


def resumed(settings: dict, saved: dict, run_dir) -> tuple[prunelab.Pruner, torch.optim.Optimizer]:
    """A Pruner on a differently initialised model, and its SGD optimizer, restored from a user's checkpoint
    (`saved`: the model's, the optimizer's and the Pruner's state dicts), as a new process would restore them."""
    again = prunelab.Pruner(net(seed=7), **settings, run_dir=run_dir)
    again.model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(again.parameters(), lr=LR, momentum=0.9)
    optimizer.load_state_dict(saved["optimizer"])
    again.load_state_dict(saved["pruner"])
    return again, optimizer


def test_rigl_in_a_plain_loop_resumes_before_an_update_step_exactly(tmp_path):
    # Saved after step 3 of 8: step 4 is a mask update, whose dense gradient the resumed loop must record.
    batches = data(8)
    settings = dict(
        method="rigl",
        budget={"sparsity": 0.5},
        example_inputs=batches[0][0],
        steps=8,
        overrides=["method.update_every=2", "method.end=1.0"],
    )

    def loop(pruner, optimizer, part):
        for x_, y in part:
            optimizer.zero_grad()
            F.cross_entropy(pruner.model(x_), y).backward()
            optimizer.step()
            pruner.after_step(optimizer)

    pruner = prunelab.Pruner(net(), **settings, run_dir=tmp_path / "a")
    loop(pruner, torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9), batches)
    whole, whole_state = weights(pruner.model), pruner.method.state_dict()

    pruner = prunelab.Pruner(net(), **settings, run_dir=tmp_path / "b")
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    loop(pruner, optimizer, batches[:3])
    saved = {"model": pruner.model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()}
    torch.save(saved, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    again, optimizer = resumed(settings, saved, tmp_path / "c")
    loop(again, optimizer, batches[3:])
    assert again.method.updates == 3 == whole_state["updates"]  # at steps 2, 4 and 6
    assert_same(weights(again.model), whole)
    state = again.method.state_dict()
    assert_same(state.pop("masks"), whole_state.pop("masks"))
    assert state["history"] == whole_state["history"] and state["step"] == whole_state["step"] == 8


def test_a_plain_loop_resumes_from_the_users_checkpoint_exactly(tmp_path):
    # 14 steps: the penalty's updates and, at step 13, the end of the method's training fall after the resume.
    batches = data(14)
    settings = dict(method="greg1", budget={"flops": 0.5}, example_inputs=batches[0][0], overrides=GREG)

    pruner = prunelab.Pruner(net(), **settings, run_dir=tmp_path / "a")
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    reasons = train(pruner, batches, optimizer)
    assert reasons[12] == "lambda passed tau=0.28 at iteration 10, then 3 steps" and not any(reasons[:12])
    whole, whole_state = weights(pruner.model), pruner.method.state_dict()

    # Stopped after 5 steps (inside an update interval) and saved, resumed in a new process with a new model.
    pruner = prunelab.Pruner(net(), **settings, run_dir=tmp_path / "b")
    optimizer = torch.optim.SGD(pruner.parameters(), lr=LR, momentum=0.9)
    first = train(pruner, batches[:5], optimizer)
    torch.save(
        {"model": pruner.model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()},
        tmp_path / "ckpt.pt",
    )
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    again, optimizer = resumed(settings, saved, tmp_path / "c")
    rest = train(again, batches[5:], optimizer)
    assert first + rest == reasons
    assert_same(weights(again.model), whole)
    assert again.method.state_dict() == whole_state

    # Without the pruner's state the penalty restarts (and the picked filters are another model's): it differs.
    fresh = prunelab.Pruner(net(seed=7), **settings, run_dir=tmp_path / "d")
    fresh.model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=0.9)
    optimizer.load_state_dict(saved["optimizer"])
    train(fresh, batches[5:], optimizer)
    assert not torch.equal(weights(fresh.model)["conv1.weight"], whole["conv1.weight"])


def test_the_callback_resumes_from_the_trainers_checkpoint_exactly(tmp_path):
    batches = data(5)
    x = batches[0][0]

    def fit(epochs: int, name: str, ckpt_path=None) -> tuple[LitNet, Pruning]:
        pruning = Pruning("greg1", {"flops": 0.5}, x, submodule="net", overrides=GREG, run_dir=tmp_path / name)
        module = LitNet(net(seed=0 if ckpt_path is None else 7))
        checkpoint = ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True)
        trainer(max_epochs=epochs, callbacks=[pruning, checkpoint], enable_checkpointing=True).fit(
            module, loader(batches), ckpt_path=ckpt_path
        )
        return module, pruning

    whole, whole_pruning = fit(2, "whole")
    fit(1, "first")
    resumed, resumed_pruning = fit(2, "resumed", ckpt_path=tmp_path / "first" / "ckpt" / "last.ckpt")
    assert resumed_pruning.pruner.steps == whole_pruning.pruner.steps == 10
    assert resumed_pruning.result.plan == whole_pruning.result.plan
    assert_same(weights(resumed.net), weights(whole.net))
