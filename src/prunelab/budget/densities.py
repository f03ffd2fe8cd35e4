"""How a sparsity budget is spread over layers before training: uniform, Erdos-Renyi (ER) or Erdos-Renyi-Kernel (ERK).

The dynamic sparse training papers fix every layer's density at the start and keep it. ER (Mocanu et al. 2018,
SET) gives a layer with n_in inputs and n_out outputs a density proportional to (n_in + n_out) / (n_in n_out);
ERK (Evci et al. 2020, RigL, Section 3) adds the kernel size: (n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w),
i.e. the sum over the weight's shape divided by its product. The common factor eps is chosen so that the kept
weights add up to the budget; a layer whose density would exceed 1 is made dense and eps is solved again over
the others (the layers of largest raw density first, as the RigL code does), until none exceeds 1.

Counts are exact: the layers together keep total - round(sparsity * total) weights, to one weight (each layer
gets floor(density * n) and the remainder goes to the layers with the largest fractional parts).
"""

from __future__ import annotations

import math

from prunelab.errors import BudgetError

DISTRIBUTIONS = ("erk", "er", "uniform")


def raw_density(shape: tuple[int, ...], distribution: str) -> float:
    """A layer's density before the common factor eps: ERK sum(shape)/prod(shape), ER (n_in + n_out)/(n_in n_out)."""
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    if distribution == "er":
        n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
        return (n_in + n_out) / (n_in * n_out)
    raise BudgetError(f"unknown layer distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")


def layer_densities(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, float]:
    """Each layer's fraction of weights kept, so that all layers together keep 1 - sparsity of their weights."""
    if not 0.0 <= sparsity < 1.0:
        raise BudgetError(f"sparsity must be in [0, 1); got {sparsity}")
    if distribution == "uniform":
        return dict.fromkeys(shapes, 1.0 - sparsity)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: raw_density(shape, distribution) for name, shape in shapes.items()}
    kept = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        scaled = [n for n in shapes if n not in dense]
        if not scaled:
            raise BudgetError(f"{distribution}: no layer is left to sparsify at sparsity {sparsity}")
        eps = (kept - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in scaled)
        largest = max(raw[n] for n in scaled)
        if eps * largest <= 1.0:
            break
        # Every layer at the largest raw density would exceed 1: make them dense and solve eps again.
        dense.update(n for n in scaled if raw[n] == largest)
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def keep_counts(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, int]:
    """Weights kept per layer at the distribution's densities, adding up exactly to total - round(sparsity * total)."""
    densities = layer_densities(shapes, sparsity, distribution)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    target = total - round(sparsity * total)
    exact = {name: min(densities[name] * sizes[name], sizes[name]) for name in shapes}
    counts = {name: min(sizes[name], math.floor(value + 1e-9)) for name, value in exact.items()}
    # Largest remainders first (ties by layer order); a dense layer has no room for more.
    order = sorted(shapes, key=lambda n: exact[n] - counts[n], reverse=True)
    missing = target - sum(counts.values())
    while missing > 0:
        room = [n for n in order if counts[n] < sizes[n]]
        for name in room[:missing]:
            counts[name] += 1
        missing = target - sum(counts.values())
    while missing < 0:
        spare = [n for n in reversed(order) if counts[n] > 0]
        for name in spare[:-missing]:
            counts[name] -= 1
        missing = target - sum(counts.values())
    return counts
