"""FPGM (He et al. 2019, "Filter Pruning via Geometric Median for Deep Convolutional Neural Networks Acceleration").

The filters of a layer closest to their geometric median carry information the others already hold, so they
are the ones to remove. The paper approximates "closest to the geometric median" (Eq. 4-6) by the filter
F_i of least summed distance to the layer's other filters, g(F_i) = sum_j ||F_i - F_j||_2, which is also
what its official code computes (Euclidean distances between the flattened filters).
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.budget import structured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, prunable_groups
from prunelab.methods.baselines import ALLOCATIONS, _OneShot, allocate
from prunelab.structure import ChannelGroup, group_weights

#: The distance between two filters: the paper's Euclidean one, or the L1 distance its code offers.
DISTANCES = {"l2": 2.0, "l1": 1.0}


class FPGM(_OneShot):
    """Prune the filters of least summed distance to the other filters of their layer, then fine-tune.

    A channel's filter is every weight that writes it: for a group produced by several layers (a residual
    stream, a depthwise convolution after its root) the rows of all of them joined into one vector, so the
    distance between two channels is sqrt(sum over layers of the squared per-layer distances).
    With `budget.layer_ratios` each group loses its given fraction; under a FLOPs, parameter or latency budget
    `allocation: uniform` ranks channels within their group so that every group loses the same fraction (the
    paper's one pruning rate for all layers), `global` divides the scores by their group's largest.
    Deviation: the official code zeroes the chosen filters after every epoch of (re)training, as SFP does;
    here they are removed once from the given weights and the pipeline's `retrain` fine-tunes the pruned model.
    """

    def __init__(self, distance: str = "l2", allocation: str = "uniform"):
        if distance not in DISTANCES:
            raise ConfigError(f"fpgm: method.distance={distance!r} is not one of {', '.join(DISTANCES)}")
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"fpgm: method.allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        self.distance = distance
        self.allocation = allocation

    def plan(self, model: nn.Module, ctx: MethodContext):
        scores = fpgm_scores(model, prunable_groups(model, ctx), self.distance)
        return structured_plan(model, allocate(scores, self.allocation), ctx)


def fpgm_scores(model: nn.Module, groups: list[ChannelGroup], distance: str = "l2") -> dict[str, torch.Tensor]:
    """Each group's channel scores: the summed distance of the channel's filter to every other filter of the group.

    Low scores lie closest to the group's geometric median and go first.
    """
    p = DISTANCES[distance]
    scores = {}
    for group in groups:
        rows = torch.cat([w.detach().flatten(1).double().cpu() for w in group_weights(model, group)], 1)
        scores[group.name] = torch.cdist(rows[None], rows[None], p=p)[0].sum(1).float()
    return scores
