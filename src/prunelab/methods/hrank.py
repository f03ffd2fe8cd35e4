"""HRank (Lin et al. 2020, "HRank: Filter Pruning using High-Rank Feature Map").

A feature map of high rank holds more information; the paper finds a channel's average rank stable over
batches, so a few batches estimate it. A channel's score is the rank of its H x W output map, averaged over
the images of `batches` training batches (the official code: 5 batches of 128, the network in eval mode);
the channels of lowest average rank go, and the pruned model is fine-tuned.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prunelab.budget import structured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, prunable_groups, training_batches
from prunelab.methods.baselines import ALLOCATIONS, _OneShot, allocate
from prunelab.structure import ChannelGroup, eval_mode

log = logging.getLogger("prunelab")


class HRank(_OneShot):
    """Prune the channels whose feature maps have the lowest average rank, then fine-tune.

    The map is taken where the official code hooks it, after BatchNorm and ReLU: the output of each BatchNorm
    that normalises the group's channels, through a ReLU (a group without one: its root layer's output, through
    a ReLU). A group with several BatchNorms (a residual stream, each block's last BatchNorm) averages their
    ranks; deviation: the official code hooks the ReLU after the residual addition for the stream's channels.
    Ranks are `torch.linalg.matrix_rank` with its default tolerance (the paper's `torch.matrix_rank`), over the
    first `batches` training batches with test-time transforms in a fixed order (the official code: shuffled
    batches with training augmentation), in eval mode. Groups whose channels are not 2-D maps (a Linear's
    features, attention heads) have no rank and are kept whole, said in the log.
    `allocation` compares groups under a FLOPs, parameter or latency budget as FPGM's does (ranks are bounded by
    each layer's own map size, so they do not compare across layers as they are).
    """

    needs_training_data = True

    def __init__(self, batches: int = 5, allocation: str = "uniform"):
        if not isinstance(batches, int) or batches < 1:
            raise ConfigError(
                f"hrank: method.batches={batches!r} must be a whole number >= 1 (batches to average ranks over)"
            )
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"hrank: method.allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        self.batches = batches
        self.allocation = allocation

    def plan(self, model: nn.Module, ctx: MethodContext):
        if ctx.data is None:
            raise ValueError("hrank: ranking feature maps needs the experiment's training data")
        groups = prunable_groups(model, ctx)
        scores = hrank_scores(model, groups, training_batches(ctx.data, self.batches))
        unscored = [g.name for g in groups if g.name not in scores]
        if unscored:
            log.info(
                "hrank: %d group(s) without 2-D feature maps are kept whole: %s", len(unscored), ", ".join(unscored)
            )
        return structured_plan(model, allocate(scores, self.allocation), ctx)


def feature_probes(model: nn.Module, group: ChannelGroup) -> list[nn.Module]:
    """The modules whose outputs are the group's feature maps (before the ReLU `hrank_scores` applies).

    The BatchNorms that normalise exactly the group's channels, else the root layer when it is a convolution.
    """
    norms = [model.get_submodule(n) for n in group.norms if n not in group.rows]
    norms = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == group.size]
    if norms:
        return norms
    root = model.get_submodule(group.name)
    if isinstance(root, nn.modules.conv._ConvNd) and root.out_channels == group.size and group.heads is None:
        return [root]
    return []


def hrank_scores(model: nn.Module, groups: list[ChannelGroup], batches: list) -> dict[str, torch.Tensor]:
    """Each group's channel scores: the rank of relu(feature map), averaged over the images of `batches` and over
    the group's probes (`feature_probes`). Groups with no 2-D maps get no score."""
    device = next(model.parameters()).device
    probes = {g.name: feature_probes(model, g) for g in groups}
    sums: dict[int, torch.Tensor] = {}
    images = 0

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        if output.dim() != 4:
            return
        ranks = torch.linalg.matrix_rank(torch.relu(output.detach()).float()).double().sum(0).cpu()
        sums[id(module)] = sums.get(id(module), 0) + ranks

    modules = {id(m): m for ms in probes.values() for m in ms}
    handles = [m.register_forward_hook(record) for m in modules.values()]
    try:
        with torch.no_grad(), eval_mode(model):
            for x, _ in batches:
                model(x.to(device))
                images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for g in groups:
        found = [sums[id(m)] for m in probes[g.name] if id(m) in sums]
        if found:
            scores[g.name] = (torch.stack(found).mean(0) / max(images, 1)).float()
    return scores
