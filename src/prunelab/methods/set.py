"""SET, Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018).

The network starts sparse, at Erdos-Renyi densities (ERK here: ER with the kernel size, which is ER itself for
the paper's fully connected layers), and after every training epoch each layer removes the fraction zeta (0.3)
of its weights closest to zero and adds as many new connections at random positions, initialised to zero (the
RigL code's SET baseline, `grow_init=zeros`). The update schedule and everything else is shared with RigL
(`methods/dynamic_sparse.py`); `update_every` sets the interval in optimizer steps instead of one epoch.

Deviation: the paper removes the fraction zeta of the smallest positive and of the largest negative weights
separately; like the RigL code's SET, we remove the fraction zeta of the active weights of smallest |w|.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.dynamic_sparse import DynamicMask, DynamicSparse


class SET(DynamicSparse):
    """Drop the fraction `zeta` of each layer's smallest |w| and regrow as many at random, every epoch.

    `update_every=None` updates after every epoch but the last (the paper); `end` (1.0) stops the updates
    before that fraction of the stage. The random positions come from the method's own generator, seeded by
    the experiment's seed and saved with its state.
    """

    name = "set"

    def __init__(self, zeta: float = 0.3, update_every: int | None = None, end: float = 1.0, **kwargs: Any):
        if not (isinstance(zeta, (int, float)) and not isinstance(zeta, bool) and 0.0 <= float(zeta) <= 1.0):
            raise ConfigError(f"set: method.zeta={zeta!r} is the fraction of active weights replaced, in [0, 1]")
        super().__init__(update_every=update_every, end=end, **kwargs)
        self.zeta = float(zeta)

    def drop_fraction(self, t: int) -> float:
        return self.zeta

    def grow_scores(self, name: str, layer: DynamicMask, weight: torch.Tensor) -> torch.Tensor:
        """Uniform random scores: the grown positions are a uniform sample of the positions not kept."""
        return torch.rand(weight.shape, generator=self.generator)
