"""Scratch-B: the epochs that give a pruned model the dense model's training compute."""

from __future__ import annotations


def scratch_b_epochs(base_epochs: int, dense_flops: float, pruned_flops: float, max_factor: float | None = None) -> int:
    """Scratch-B (Liu et al. 2019): train the pruned model for the dense model's compute budget.

    The epochs grow by dense FLOPs / pruned FLOPs, at most by `max_factor` when one is given.
    """
    factor = dense_flops / max(pruned_flops, 1)
    if max_factor is not None:
        factor = min(factor, max_factor)
    return max(1, int(round(base_epochs * factor)))
