"""Measuring models: multiply-accumulates ("FLOPs", as the pruning papers count them), parameters, sparsity."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single input of `input_shape` (C, H, W).

    PyTorch's FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and matrix
    products; we halve it to report MACs, the unit the pruning papers call FLOPs. Element-wise layers
    (BN, ReLU, additions) are not counted, as in those papers.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, *input_shape, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight tensors of convolutions and linear layers: what unstructured pruning acts on."""
    return [
        (f"{name}.weight" if name else "weight", m.weight)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight is not None
    ]


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among the prunable weights."""
    weights = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def measure(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs (MACs), parameters and sparsity of a model, as `summary.json` reports them."""
    return {"flops": count_flops(model, input_shape), "params": count_params(model), "sparsity": sparsity(model)}
