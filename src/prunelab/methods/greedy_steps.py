"""The algebra of greedy imitation's steps (Ye et al.): contributions, their Gram matrix, local imitation's
closed-form step and discrepancy, the move of the weights A, the first-order scores of global imitation, and
folding the weights into the consumers. The method that drives them is `prunelab.methods.greedy`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def local_step(gram: torch.Tensor, u: torch.Tensor, active: torch.Tensor) -> tuple[int, float, float]:
    """One step of local imitation: (neuron i, step g, decrease of the discrepancy) by the closed form.

    `gram` is G (N x N), `u` = N a, `active` marks a_i > 0. Candidates are every neuron; U_i = [0, 1]
    for inactive ones and [-a_i / (1 - a_i), 1] for active ones (an active neuron alone, a_i = 1,
    cannot move).
    """
    n = gram.shape[0]
    ones = torch.ones_like(u)
    gu, gr = gram @ u, gram @ (u - ones)
    b = n * gr - (u - ones) @ gu
    q = n * n * torch.diagonal(gram) - 2 * n * gu + u @ gu
    a = u / n
    lower = torch.where(active, -a / (1 - a).clamp_min(1e-12), torch.zeros_like(a))
    g = torch.where(q > 0, -b / q.clamp_min(1e-30), torch.where(b < 0, torch.ones_like(b), lower))
    g = torch.minimum(torch.maximum(g, lower), torch.ones_like(g))
    decrease = -(2 * g * b + g * g * q)
    decrease = torch.where(active & (a >= 1 - 1e-12), torch.full_like(decrease, -math.inf), decrease)
    i = int(torch.argmax(decrease))
    return i, float(g[i]), float(decrease[i])


def local_discrepancy(gram: torch.Tensor, u: torch.Tensor) -> float:
    """E||sum_i u_i c_i - sum_i c_i||^2 from the Gram matrix."""
    r = u - torch.ones_like(u)
    return float(r @ gram @ r)


def move(a: torch.Tensor, i: int, g: float) -> torch.Tensor:
    """A <- (1 - g) A + g e_i; a step at the lower end of U_i removes neuron i (its weight is set to exactly 0)."""
    lower = -float(a[i] / (1 - a[i])) if 0 < a[i] < 1 else 0.0
    out = (1 - g) * a
    out[i] += g
    if a[i] > 0 and g <= lower + 1e-12:
        out[i] = 0.0
    out.clamp_(min=0.0)
    return out / out.sum()


def contributions(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """c_i for every input channel i of `consumer` on input `x`: (batch, N, features), bias left out."""
    if isinstance(consumer, nn.Linear):
        return x.unsqueeze(-1) * consumer.weight.t().unsqueeze(0)
    n = x.shape[1]
    if consumer.groups != 1:
        raise ValueError("contributions: grouped consumers are not supported")
    out_channels = consumer.out_channels
    weight = consumer.weight.transpose(0, 1).reshape(n * out_channels, 1, *consumer.weight.shape[2:])
    per = F.conv2d(x, weight, None, consumer.stride, consumer.padding, consumer.dilation, groups=n)
    return per.reshape(x.shape[0], n, -1)


def gram_of(consumer: nn.Module, x: torch.Tensor, budget: int = 2**24) -> torch.Tensor:
    """G_jk = E_batch <c_j, c_k> (float64), accumulated over sub-batches of at most `budget` floats."""
    n = x.shape[1]
    per_example = n * max(1, contributions(consumer, x[:1]).shape[-1])
    step = max(1, budget // per_example)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, x.shape[0], step):
            c = contributions(consumer, x[start : start + step]).double()
            gram += torch.einsum("bif,bjf->ij", c, c)
    return gram / x.shape[0]


class Scales:
    """Forward pre-hooks multiplying the input channels of every consumer by `u` (capturing the first's input).

    `consumers[0]` is the layer whose contributions local imitation imitates; the others read the same
    channels through a squeeze-excitation gate (see `GreedyImitation._consumers`).
    """

    def __init__(self, consumers: list[nn.Module]) -> None:
        self.consumer = consumers[0]
        self.consumers = consumers
        self.u: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self.capture = False
        self.handles = [c.register_forward_pre_hook(self) for c in consumers]

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if self.capture and module is self.consumer:
            self.captured = x.detach()
        if self.u is None:
            return None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * self.u.to(x.dtype).view(shape), *args[1:])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def soft_ce(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits` against the reference network's softmax, batch mean."""
    return -(F.softmax(reference, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def fold(consumers: list[nn.Module], a: torch.Tensor) -> None:
    """Fold u = N a into every consumer's input weights (W[:, i] *= N a_i)."""
    n = a.numel()
    with torch.no_grad():
        for consumer in consumers:
            u = (n * a).to(device=consumer.weight.device, dtype=consumer.weight.dtype)
            consumer.weight.mul_(u.view((1, -1) + (1,) * (consumer.weight.dim() - 2)))


def taylor_scores(
    model: nn.Module, hook: Scales, a: torch.Tensor, x: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """dD/dg at g = 0 for every candidate i along u(g) = N((1 - g) a + g e_i), D the soft cross-entropy."""
    n = a.numel()
    scales = (n * a).float().clone().requires_grad_(True)
    hook.u = scales
    with torch.enable_grad():
        grad = torch.autograd.grad(soft_ce(model(x), reference), scales)[0].double()
    hook.u = None
    return n * (grad - a @ grad)


def best_per_count(history: list[tuple[int, float]], size: int) -> list[float | None]:
    """For n = 1..size, the smallest discrepancy among the steps that kept at most n neurons (None: none did)."""
    best: list[float | None] = []
    current = math.inf
    by_count: dict[int, float] = {}
    for count, value in history:
        by_count[count] = min(by_count.get(count, math.inf), value)
    for n in range(1, size + 1):
        current = min(current, by_count.get(n, math.inf))
        best.append(current if math.isfinite(current) else None)
    return best
