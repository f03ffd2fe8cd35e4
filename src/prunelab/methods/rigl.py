r"""RigL, "Rigging the Lottery: Making All Tickets Winners" (Evci et al., ICML 2020).

Sparse from the start at ERK densities (Section 3; the first layer dense, as the RigL code), random mask. Every
Delta T = 100 optimizer steps while t < T_end = 0.75 T, each layer drops the fraction

    f_t = alpha / 2 * (1 + cos(pi t / T_end))      (alpha = 0.3, Eq. 1's cosine annealing)

of its active weights of smallest |w| and grows as many connections where the dense gradient |dL/dW| of the
update step's batch is largest, among the positions not kept (Algorithm 1: ArgTopK over i not in theta \ I_drop);
grown weights start at zero. The gradient is with respect to the effective weight W = w * m, so it is dense
(`DynamicMask` records it with a hook on the masked weight, only on the batches of update steps); under DDP it is
averaged over the ranks first, so every rank grows the same connections.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.dynamic_sparse import DynamicMask, DynamicSparse, dense_gradient_mean


def cosine_drop_fraction(alpha: float, t: int, t_end: float) -> float:
    """f_t = alpha / 2 * (1 + cos(pi t / T_end)), zero from T_end on."""
    if t >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


class RigL(DynamicSparse):
    """Drop by magnitude, grow by the dense gradient, with the cosine-annealed drop fraction of `alpha`."""

    name = "rigl"
    needs_dense_grad = True

    def __init__(self, alpha: float = 0.3, update_every: int | None = 100, end: float = 0.75, **kwargs: Any):
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= float(alpha) <= 1.0):
            raise ConfigError(f"rigl: method.alpha={alpha!r} is the initial drop fraction, in [0, 1]")
        if update_every is None:
            raise ConfigError("rigl: method.update_every must be a whole number of steps (Delta T, the paper's 100)")
        super().__init__(update_every=update_every, end=end, **kwargs)
        self.alpha = float(alpha)

    def drop_fraction(self, t: int) -> float:
        return cosine_drop_fraction(self.alpha, t, self.end * self.total_steps)

    def grow_scores(self, name: str, layer: DynamicMask, weight: torch.Tensor) -> torch.Tensor:
        """|dL/dW| of the update step's batch, W the effective weight."""
        if layer.dense_grad is None:
            raise RuntimeError(f"rigl: no dense gradient was recorded for {name} at step {self.step}")
        return dense_gradient_mean(layer.dense_grad).abs()
