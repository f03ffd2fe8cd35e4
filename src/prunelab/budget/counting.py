"""Counting models: multiply-accumulates ("FLOPs", as the pruning papers count them), parameters, sparsity."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.structure import eval_mode, freeze, prunable_weights, unfreeze


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of `input_shape` (C, H, W).

    PyTorch's FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matrix
    products; we halve it to report MACs, the unit the pruning papers call FLOPs. Element-wise layers
    (BN, ReLU, additions) are not counted, as in those papers. The model runs in eval mode, and every
    submodule gets its own training flag back afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    with _counting(model) as counter:
        model(x)
    return counter.get_total_flops() // 2


@contextmanager
def _counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """FlopCounterMode over a forward pass in eval mode without gradients. The parameters stop requiring gradients
    meanwhile: a view of one made under no_grad still requires them, with no autograd node, and FlopCounterMode's
    module tracker fails on it as a module's input (timm's PiT and CaiT pass an expanded class token)."""
    flags = freeze(model)
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        unfreeze(model, flags)


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the prunable weights."""
    weights = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def measure(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs (MACs), parameters and sparsity of a model, as `summary.json` reports them."""
    return {"flops": count_flops(model, input_shape), "params": count_params(model), "sparsity": sparsity(model)}
