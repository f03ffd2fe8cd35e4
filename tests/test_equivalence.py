"""Every fast formulation of a search or a method against its plain form, the paper's equation written directly.

Each test runs the optimized path and a reference side by side on a tiny model for several optimizer
steps, with the same batches, and compares the outputs, the gradient of every trainable tensor, the
trained tensors and what the method decides from them (gates' plan, masks).

They run in float64. In float32 the two forms differ by rounding (their products are associated
differently), and a search can amplify that: Adam moves a gate by a whole step whatever its gradient's
size, so a near-zero gradient whose sign rounding flips moves it the other way. Measured on the
mobilenet_v2_tiny gate search below: float32 gate gradients 3e-7 apart (relative) at the first step and
2e-2 apart at the sixth, float64 1e-15 at every step. That is how `experiment=pfs_resnet20_digits_quick` moved when the
gates were folded into BatchNorm (commit a40737e): the same equation, other rounding, other near-tied
gates on either side of the budget. In float64 a tolerance of 1e-9 separates rounding from a real change.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import randomize_bn
from omegaconf import OmegaConf
from torch import nn

from prunelab.backbones import create
from prunelab.budget import search_threshold
from prunelab.methods.base import MethodContext, Stage
from prunelab.methods.greg import GReg1
from prunelab.methods.jackpot import EdgePopup, Jackpot
from prunelab.methods.pfs import ChannelGates, PruningFromScratch, rank_scores

SHAPE = (3, 32, 32)
STEPS = 6
# Relative and absolute tolerances: float64 rounding after a few steps is ~1e-15.
RTOL, ATOL = 1e-9, 1e-12
DTYPE = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny models run fastest so, and the comparison does not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(steps: int = STEPS, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, *SHAPE, generator=generator, dtype=DTYPE),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for _ in range(steps)
    ]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding: elementwise, on the scale of the tensor's largest entry."""
    assert a.shape == b.shape, what
    scale = float(b.abs().max()) if b.numel() else 0.0
    assert torch.allclose(a, b, rtol=RTOL, atol=ATOL + RTOL * scale), (
        f"{what}: max difference {float((a - b).abs().max()):.3g}"
    )


# Pruning from Scratch: gates folded into the BatchNorm affine vs the gate multiplied onto the BN output.


def _plain_gates(model: nn.Module, method: PruningFromScratch) -> ChannelGates:
    """The paper's gated network written directly: every gate point's output multiplied by its channel gate."""
    gated = method.gated_groups(model)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = ChannelGates({group.name: group.size for group, _ in gated})
    for index, (_, points) in enumerate(gated):
        for point in points:
            model.get_submodule(point).register_forward_hook(
                lambda module, inputs, output, index=index: (
                    output * gates.gates[index].view(1, -1, *([1] * (output.dim() - 2)))
                )
            )
    return gates


@pytest.mark.parametrize("backbone", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_pfs_folded_gates_equal_gates_on_the_batchnorm_output(backbone):
    torch.manual_seed(0)
    method = PruningFromScratch(ratio=0.5, gamma=0.5, lr=0.05)
    model = method.initial_model(create(backbone))
    # Non-zero BatchNorm shifts, so that the gate folded into the bias is tested too (a fresh one has none).
    randomize_bn(model)
    model.to(DTYPE).prunelab.input_shape = SHAPE
    reference = copy.deepcopy(model)
    model.train(), reference.train()
    method.setup(model, Stage("search", "fit"), None)
    fast = method.state_module().to(DTYPE)
    plain = _plain_gates(reference, method).to(DTYPE)
    optimizers = [torch.optim.Adam(fast.parameters(), lr=0.05), torch.optim.Adam(plain.parameters(), lr=0.05)]
    assert len(fast.gates) == len(plain.gates) > 1
    for step, (x, y) in enumerate(_batches()):
        out_fast, out_plain = model(x), reference(x)
        _close(out_fast, out_plain, f"step {step}: logits")
        losses = []
        for out, gates in ((out_fast, fast), (out_plain, plain)):
            flat = gates.flat()
            # cross-entropy + gamma * (sum_j ||lambda_j||_1 / sum_j C_j - r)^2
            losses.append(nn.functional.cross_entropy(out, y) + 0.5 * (flat.abs().sum() / flat.numel() - 0.5) ** 2)
        for loss, optimizer in zip(losses, optimizers):
            optimizer.zero_grad()
            loss.backward()
        for i, (a, b) in enumerate(zip(fast.gates, plain.gates)):
            _close(a.grad, b.grad, f"step {step}: gradient of gate {fast.names[i]}")
        for optimizer in optimizers:
            optimizer.step()
        method.after_optimizer_step(model, step)
        with torch.no_grad():
            for gate in plain.gates:
                gate.clamp_(0.0, 1.0)
        _close(fast.flat(), plain.flat(), f"step {step}: gates")
    # The BatchNorm statistics moved alike (training mode), and the weights of neither network.
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        if a.is_floating_point():
            _close(a, b, name)
    # The same gates, so the same ranks and the same plan to a FLOPs budget.
    fast_ranks = rank_scores(fast.by_group(fast.flat()))
    plain_ranks = rank_scores(plain.by_group(plain.flat()))
    assert all(torch.equal(fast_ranks[n], plain_ranks[n]) for n in fast_ranks)
    method.teardown(model, Stage("search", "fit"))
    model.float()
    plan, _ = search_threshold(model, fast_ranks, 0.5, SHAPE, tolerance=0.02)
    plain_plan, _ = search_threshold(model, plain_ranks, 0.5, SHAPE, tolerance=0.02)
    assert plan.keep == plain_plan.keep


# SR-popup and edge-popup: the masked weight in one autograd function vs weight * straight-through mask.


def _plain_forward(self, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 6 written directly: h(m) is the binary mask forward; its gradient reaches m unchanged (through |m| for
    edge-popup), rescaled to a mean magnitude first where `grad_scale` is set."""
    key = self.scores.abs() if self.absolute else self.scores
    h = self.mask + (key - key.detach())
    if self.grad_scale is not None and h.requires_grad:
        h.register_hook(lambda grad: grad * (self.grad_scale / grad.abs().mean()))
    return weight * h


@pytest.mark.parametrize(
    "cls, allocation, grad_scale",
    [
        (Jackpot, "magnitude", None),
        (Jackpot, "global", 1e-3),
        (EdgePopup, "uniform", None),
        (EdgePopup, "magnitude", 1e-3),
    ],
)
def test_score_search_masked_weight_equals_the_straight_through_mask(cls, allocation, grad_scale):
    searches, models = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = create("resnet_tiny").to(DTYPE).train()
        method = cls(sparsity=0.8, allocation=allocation, epochs=1, lr=0.5, momentum=0.9, weight_decay=5e-4)
        method.seed = 3
        stage = next(s for s in method.stages() if s.kind == "fit")
        method.setup(model, stage, None)
        method.total_steps = STEPS
        model.to(DTYPE)
        for layer in method._layers.values():
            layer.grad_scale = grad_scale
        searches.append(method)
        models.append(model)
    for layer in searches[1]._layers.values():
        layer.forward = types.MethodType(_plain_forward, layer)
    optimizers = [
        torch.optim.SGD(m.parameters_to_train(net), lr=0.5, momentum=0.9, weight_decay=5e-4)
        for m, net in zip(searches, models)
    ]
    for step, (x, y) in enumerate(_batches()):
        outs = [net(x) for net in models]
        _close(outs[0], outs[1], f"step {step}: logits")
        for out, optimizer in zip(outs, optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(out, y).backward()
        for name in searches[0]._layers:
            a, b = searches[0]._layers[name], searches[1]._layers[name]
            _close(a.scores.grad, b.scores.grad, f"step {step}: gradient of the scores of {name}")
        for method, net, optimizer in zip(searches, models, optimizers):
            optimizer.step()
            method.after_optimizer_step(net, step)
        for name in searches[0]._layers:
            a, b = searches[0]._layers[name], searches[1]._layers[name]
            _close(a.scores, b.scores, f"step {step}: scores of {name}")
            assert torch.equal(a.mask, b.mask), f"step {step}: mask of {name}"
        assert searches[0].history[-1]["swaps"] == searches[1].history[-1]["swaps"]
    assert sum(sum(r["swaps"]) for r in searches[0].history) > 0
    # Frozen weights hold no gradient in either form.
    for net in models:
        assert all(p.grad is None for n, p in net.named_parameters() if not n.endswith("scores"))


# Growing Regularization: the penalty as a loss term vs the official code's gradient update grad += lambda * w.


def test_greg_penalty_in_the_loss_equals_the_official_gradient_update(tmp_path):
    budget = OmegaConf.create(
        {"flops": 0.6, "tolerance": 0.05, "iterations": 30, "round_to": 1, "prune_coupled": False}
    )
    records, methods = [], []
    for official in (False, True):
        torch.manual_seed(0)
        model = create("resnet_tiny").train()
        method = GReg1(delta_lambda=0.05, tau=1.0, update_interval=2, stabilize_steps=2, lr=0.05)
        ctx = MethodContext(budget=budget, data=None, input_shape=SHAPE, num_classes=10, seed=0, run_dir=tmp_path)
        method.setup(model, Stage("regularize", "fit"), ctx)
        model.to(DTYPE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        grads = []
        for step, (x, y) in enumerate(_batches()):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if official:
                loss.backward()
                # The official code: after the backward pass, grad += lambda * w on the penalised weights.
                if not method._lambdas:
                    method._lambdas = method._build_lambdas(model)
                with torch.no_grad():
                    for name, lam in method._lambdas.items():
                        weight = model.get_parameter(name)
                        weight.grad.add_(lam * weight)
            else:
                # prunelab: 1/2 sum_j lambda_j ||w_j||^2 added to the loss.
                (loss + method.extra_loss(model)).backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            optimizer.step()
            method.after_optimizer_step(model, step)
        records.append((grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
        methods.append(method)
    assert methods[0].grows > 1 and methods[0].lambda_pruned() > 0
    (loss_grads, loss_weights), (official_grads, official_weights) = records
    for step, (a, b) in enumerate(zip(loss_grads, official_grads)):
        for name in a:
            _close(a[name], b[name], f"step {step}: gradient of {name}")
    for name in loss_weights:
        _close(loss_weights[name], official_weights[name], f"weight {name}")
    assert methods[0].selection == methods[1].selection and methods[0].selection["keep"]
