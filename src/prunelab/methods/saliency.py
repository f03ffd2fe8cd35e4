"""Per-weight saliency scores of the unstructured criteria: magnitude, SNIP, GraSP, SynFlow, LAMP, random.

The one place these scores are computed: the pruning-at-initialisation methods (`snip`, `grasp`, `synflow`),
`lamp`, and the lottery-jackpot search (its initial masks and overlap references) all call these functions.
Every function takes the model and the names of the weights to score (parameter names, as
`prunable_weights` gives them) and returns one score tensor per name, shaped like the weight. Gradients are
taken on a copy of the model, so the model, its `requires_grad` flags and its BatchNorm statistics stay as
they are.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from prunelab.structure import freeze

#: The criteria `criterion_scores` knows (the lottery-jackpot search starts from, and compares with, their masks).
CRITERIA = ("magnitude", "snip", "grasp", "random")

#: GraSP divides the logits by a temperature before its gradient-flow computation (Wang et al., T = 200).
GRASP_TEMPERATURE = 200.0

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _scoring_copy(model: nn.Module, names: Iterable[str]) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of the model in training mode whose only trainable tensors are the named weights."""
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    ws = [params[n] for n in names]
    freeze(net)
    for w in ws:
        w.requires_grad_(True)
    return net, ws


def _require(batches: Batches, criterion: str) -> None:
    if not batches:
        raise ValueError(f"the {criterion} criterion needs at least one batch of training data")


def snip_scores(model: nn.Module, names: Iterable[str], batches: Batches) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |g * w| (Lee et al. 2019, up to its normalisation by the sum).

    g = dL/dw is the gradient of the cross-entropy summed over `batches` (each batch's mean loss).
    Dividing by the sum of all scores, as the paper does, leaves the ranking unchanged, so it is left out.
    """
    names = list(names)
    _require(batches, "snip")
    net, ws = _scoring_copy(model, names)
    device = ws[0].device
    total = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(net(x.to(device)), y.to(device)), ws)
        total = [t + g for t, g in zip(total, grads)]
    return {n: (w.detach() * g).abs().cpu() for n, w, g in zip(names, ws, total)}


def hessian_gradient(
    model: nn.Module, names: Iterable[str], batches: Batches, temperature: float = GRASP_TEMPERATURE
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """GraSP's gradient g and Hessian-gradient product Hg of the loss with logits divided by `temperature`.

    g is summed over `batches`; Hg is the gradient of g . stop_grad(g) (a double backward), the
    per-batch terms summed over the same batches, as the official code sums them over its two half-batches.
    Returns (g, Hg) per name, on the weights' device.
    """
    names = list(names)
    _require(batches, "grasp")
    net, ws = _scoring_copy(model, names)
    device = ws[0].device
    loss_fn = nn.functional.cross_entropy
    # First the gradient g of the tempered loss, then Hg as the gradient of g . stop_grad(g).
    g = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        loss = loss_fn(net(x.to(device)) / temperature, y.to(device))
        g = [a + b for a, b in zip(g, torch.autograd.grad(loss, ws))]
    hg = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        loss = loss_fn(net(x.to(device)) / temperature, y.to(device))
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        z = sum((a * b.detach()).sum() for a, b in zip(grads, g))
        hg = [a + b for a, b in zip(hg, torch.autograd.grad(z, ws))]
    return dict(zip(names, g)), dict(zip(names, hg))


def grasp_scores(
    model: nn.Module, names: Iterable[str], batches: Batches, temperature: float = GRASP_TEMPERATURE
) -> dict[str, torch.Tensor]:
    """GraSP's score S = -w * Hg (Wang et al. 2020); GraSP removes the weights with the LARGEST S.

    Removing a weight with a large S reduces the gradient norm the least (or increases it), so the
    weights kept are those with the smallest S; `-S` is therefore the importance a top-k keeps.
    """
    names = list(names)
    _, hg = hessian_gradient(model, names, batches, temperature)
    weights = dict(model.named_parameters())
    return {n: -(weights[n].detach().to(hg[n].device) * hg[n]).cpu() for n in names}


def synflow_scores(
    model: nn.Module,
    names: Iterable[str],
    input_shape: tuple[int, ...],
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """SynFlow's synaptic saliency dR/dtheta * theta of the linearised network (Tanaka et al. 2020).

    The network is linearised as the official code does: every floating tensor of its state (weights,
    biases, BatchNorm affine parameters and running statistics) is replaced by its absolute value, the
    network runs in eval mode (BatchNorm an affine map with its running statistics) on one input of all
    ones, and R is the sum of its output. `masks` (True keeps) zero the pruned weights first, as the
    iterative algorithm prunes between scorings. Computed in float64 (the official code uses float32):
    R grows like the product of the layers' weight sums, which overflows float32 in deep networks.
    """
    names = list(names)
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    params = dict(net.named_parameters())
    ws = [params[n] for n in names]
    freeze(net)
    with torch.no_grad():
        for n, w in zip(names, ws):
            if masks is not None and n in masks:
                w.mul_(masks[n].to(w.device, w.dtype))
    for w in ws:
        w.requires_grad_(True)
    device = ws[0].device
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    grads = torch.autograd.grad(net(ones).sum(), ws)
    return {n: (g * w).detach().abs().cpu() for n, w, g in zip(names, ws, grads)}


def lamp_scores(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP scores (Lee et al. 2021): w_u^2 / sum of w_v^2 over the layer's weights with |w_v| >= |w_u|.

    Each tensor is scored on its own; the largest weight of every layer scores 1, so a global ranking of
    the scores keeps at least one weight per layer. Weights of equal magnitude share a score (the paper's
    sum runs over the sorted positions v >= u, which leaves the order of ties to the sort). The suffix sums
    are taken in float64, so that the largest weights' denominators do not lose digits.
    """
    out = {}
    for name, w in weights.items():
        squares = w.detach().double().flatten() ** 2
        ordered, order = torch.sort(squares)
        # Sums over the sorted positions from each one to the end; a tie takes the sum from its first position.
        suffix = ordered.flip(0).cumsum(0).flip(0)
        first = torch.searchsorted(ordered, ordered, right=False)
        denominators = torch.empty_like(squares)
        denominators[order] = suffix[first]
        scores = torch.where(denominators > 0, squares / denominators.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        out[name] = scores.float().view(w.shape).cpu()
    return out


def criterion_scores(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    criterion: str,
    batches: Batches,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Importance of every weight under a pruning criterion; the lowest are pruned first.

    magnitude |w|; snip |w * dL/dw| summed over the batches; grasp w * Hg, the negative of GraSP's
    score -w * Hg (GraSP removes the weights with the largest -w * Hg); random uniform noise. The
    gradients are taken on a copy of the model in training mode, so the model and its BN statistics
    are left untouched.
    """
    if criterion == "magnitude":
        return {n: w.detach().abs().cpu() for n, w in weights.items()}
    if criterion == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}
    if criterion == "snip":
        return snip_scores(model, weights, batches)
    if criterion == "grasp":
        return {n: -s for n, s in grasp_scores(model, weights, batches).items()}
    raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
