"""ThiNet (Luo, Wu & Lin, ICCV 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression").

A channel is judged by what the NEXT layer loses without it. For a sampled output y = sum_c x_hat_c + b of a layer
reading the group's channels (one output channel k at one location of one image), x_hat_c is channel c's contribution,
sum over the kernel of W[k, c] * x[c, window] (Eq. 1-3). Removing the set T changes y by sum_{c in T} x_hat_c, so the
removed set is chosen to minimise

    sum over samples i of ( sum_{c in T} x_hat_{i,c} )^2                                            (Eq. 5)

greedily (Algorithm 1): starting from T = {}, add the channel that keeps this sum smallest, until T holds the layer's
share. The greedy order does not depend on the share, so the full order is computed once and a channel's score is the
step at which it would be removed, normalised to ((step + 0.5) / size): with a FLOPs or parameter budget one global
threshold on these ranks then removes the same fraction of every group, ThiNet's one compression rate for all layers
(as `Uniform` does), and `budget.layer_ratios` gives each group its own. After the selection the next layer's weights
of the kept channels are scaled by w_hat = argmin_w sum_i (y_hat_i - w^T x_hat_i)^2 (Eq. 6, least squares over the same
samples, y_hat the unpruned output without bias), which `refit: false` turns off.

Samples: `samples` random (output channel, location) pairs per image of `batches` training batches (test-time
transforms, fixed order, seeded by the experiment's seed), the model in eval mode. A group whose channels several
layers read (a residual stream) sums the reconstruction terms of all of them (their samples are pooled); the paper's
ResNet setting prunes only the first convolution of each block (`budget.prune_coupled=false`, as the presets set).
Readers that are convolutions other than plain Conv2d with groups = 1, or not Linear, give no samples; a group none of
whose readers gives any falls back to the rank of its L1 norms (Li et al.), and is not refitted.
Deviation: the paper prunes and fine-tunes layer by layer; here every group is selected on the unpruned network, in one
prune, and the pipeline fine-tunes once (as the paper's comparisons at a fixed FLOPs budget use it).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.budget import structured_plan
from prunelab.errors import ConfigError
from prunelab.methods.base import MethodContext, PruningMethod, Stage, prunable_groups, training_batches
from prunelab.methods.baselines import STRUCTURED, l1_scores
from prunelab.structure import ChannelGroup, ChannelPlan, CoupledSlice, coupled_slices, eval_mode


class ThiNet(PruningMethod):
    """Greedy channel selection by the next layer's reconstruction error, then a least-squares refit of that layer."""

    budget_keys = STRUCTURED
    needs_training_data = True

    def __init__(self, batches: int = 10, samples: int = 10, refit: bool = True) -> None:
        for key, value in (("batches", batches), ("samples", samples)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"thinet: method.{key}={value!r} must be a whole number >= 1")
        if not isinstance(refit, bool):
            raise ConfigError(f"thinet: method.refit={refit!r} must be true or false")
        self.batches, self.samples, self.refit = batches, samples, refit

    def stages(self) -> list[Stage]:
        return [Stage("prune", "prune")]

    def plan(self, model: nn.Module, ctx: MethodContext):
        if ctx.data is None:
            raise ValueError("thinet: the reconstruction needs the experiment's training data")
        groups = prunable_groups(model, ctx)
        slices = coupled_slices(model, groups, ctx.input_shape)
        batches = training_batches(ctx.data, self.batches)
        contributions = collect_contributions(model, groups, slices, batches, self.samples, ctx.seed)
        fallback = l1_scores(model, groups)
        scores = {}
        for g in groups:
            x = contributions.get(g.name)
            order = greedy_order(x) if x is not None else torch.argsort(fallback[g.name], stable=True).tolist()
            scores[g.name] = rank_scores(order)
        plan = structured_plan(model, scores, ctx)
        if self.refit:
            refit_readers(model, groups, slices, contributions, plan)
        return plan


def contributions_of(
    layer: nn.Module,
    x: torch.Tensor,
    piece: CoupledSlice,
    size: int,
    images: torch.Tensor,
    outputs: torch.Tensor,
    places: torch.Tensor,
) -> torch.Tensor:
    """x_hat (samples, size): each of the group's channels' contribution to `layer`'s output channel `outputs[i]` at
    location `places[i]` (an index into the layer's output positions, row-major) of image `images[i]`, given the
    layer's input `x`; the channels' input columns are `piece.idxs` (one or several per channel: `piece.root`)."""
    w = layer.weight.detach()
    idxs, root = piece.idxs.to(x.device), piece.root.to(x.device)
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])[images]  # for tokens, `images` indexes the rows of all tokens
        parts = rows[:, idxs] * w[outputs][:, idxs]
    else:
        patches = _patches(layer, x, images, places)[:, idxs]  # (samples, J, kernel)
        kernels = w.flatten(2)[outputs][:, idxs]  # (samples, J, kernel)
        parts = (patches * kernels).sum(2)
    out = parts.new_zeros(parts.shape[0], size, dtype=torch.float64)
    return out.index_add_(1, root, parts.double())


def _patches(layer: nn.Conv2d, x: torch.Tensor, images: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """The input windows of the sampled outputs, (samples, C_in, kernel): what `F.unfold` gives at those places, read
    without unfolding the whole batch."""
    # String padding ("same") never reaches here: `_readable` leaves such layers to the L1 fallback.
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ph, pw = cast("tuple[int, int]", layer.padding)
    width = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph))
    rows = (places // width * sh)[:, None] + torch.arange(kh, device=x.device) * dh  # (samples, kh)
    cols = (places % width * sw)[:, None] + torch.arange(kw, device=x.device) * dw  # (samples, kw)
    windows = padded[images[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (samples, kh, kw, C_in)
    return windows.flatten(1, 2).transpose(1, 2)


def _readable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


@torch.no_grad()
def collect_contributions(
    model: nn.Module,
    groups: list[ChannelGroup],
    slices: dict[str, list[CoupledSlice]],
    batches: list,
    samples: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Each group's x_hat over all sampled outputs of all its readers, (samples, size) in float64.

    Every reader samples `samples` (output channel, location) pairs per image (for a Linear on tokens, per row of
    tokens in one image's place) with one generator, the same pairs for every group it reads.
    """
    sizes = {g.name: g.size for g in groups}
    readers: dict[str, list[tuple[str, CoupledSlice]]] = {}
    for name, pieces in slices.items():
        for piece in pieces:
            if piece.kind == "in" and _readable(model.get_submodule(piece.layer)):
                readers.setdefault(piece.layer, []).append((name, piece))
    found: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(int(seed))

    def hook_for(layer_name: str):
        def hook(layer: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            n = x.shape[0]
            if isinstance(layer, nn.Linear):
                count = x.reshape(-1, x.shape[-1]).shape[0]
                images = torch.randint(count, (n * samples,), generator=generator)
                places = torch.zeros_like(images)
            else:
                h, w = (
                    (s + 2 * p - d * (k - 1) - 1) // st + 1
                    for s, p, d, k, st in zip(
                        x.shape[2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride
                    )
                )
                images = torch.arange(n).repeat_interleave(samples)
                places = torch.randint(h * w, (n * samples,), generator=generator)
            outputs = torch.randint(layer.weight.shape[0], (n * samples,), generator=generator)
            images, outputs, places = (t.to(x.device) for t in (images, outputs, places))
            for name, piece in readers[layer_name]:
                found.setdefault(name, []).append(
                    contributions_of(layer, x, piece, sizes[name], images, outputs, places).cpu()
                )

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in readers]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for x, _ in batches:
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in found.items()}


def greedy_order(x: torch.Tensor) -> list[int]:
    """Algorithm 1 run to the end: the channels in the order the greedy adds them to the removed set T, each time the
    one that minimises sum_i (sum_{c in T} x_hat_ic)^2.

    With s = the removed channels' summed contributions, the sum after adding c is ||s||^2 + 2 s.x_c + ||x_c||^2, so it
    keeps v = X^T s (one column of the Gram matrix X^T X added per step): O(C^2 S) for the Gram matrix, O(C) per step.
    Ties go to the lowest channel index.
    """
    x = x.double()
    gram = x.T @ x
    size = gram.shape[0]
    v = torch.zeros(size, dtype=torch.float64)
    left = torch.ones(size, dtype=torch.bool)
    order = []
    for _ in range(size):
        value = (2 * v + gram.diagonal()).masked_fill(~left, float("inf"))
        c = int(value.argmin())
        order.append(c)
        left[c] = False
        v += gram[:, c]
    return order


def rank_scores(order: list[int]) -> torch.Tensor:
    """Scores (step + 0.5) / size of a removal order: the channel removed first scores lowest."""
    size = len(order)
    scores = torch.empty(size)
    scores[torch.tensor(order)] = (torch.arange(size, dtype=torch.float) + 0.5) / size
    return scores


def least_squares_scales(x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Eq. 6: w_hat = argmin_w sum_i (y_hat_i - w^T x_hat_i[kept])^2, y_hat_i = sum over all channels of x_hat_ic."""
    target = x.sum(1, keepdim=True)
    return torch.linalg.lstsq(x[:, kept], target).solution.flatten()


@torch.no_grad()
def refit_readers(
    model: nn.Module,
    groups: list[ChannelGroup],
    slices: dict[str, list[CoupledSlice]],
    contributions: dict[str, torch.Tensor],
    plan: ChannelPlan,
) -> None:
    """Scale the input columns of every layer reading each group's kept channels by their w_hat (Eq. 6), in place,
    before the channels are removed; groups read by a layer that gave no samples are left as they are."""
    for g in groups:
        x = contributions.get(g.name)
        kept = plan.keep.get(g.name)
        if x is None or kept is None or len(kept) == g.size:
            continue
        readers = [p for p in slices[g.name] if p.kind == "in"]
        if not all(_readable(model.get_submodule(p.layer)) for p in readers):
            continue
        scale = torch.ones(g.size, dtype=torch.float64)
        scale[kept] = least_squares_scales(x, kept)
        for piece in readers:
            w = model.get_submodule(piece.layer).weight
            factor = scale[piece.root].to(w.device, w.dtype)
            shape = [1] * w.dim()
            shape[piece.dim] = -1
            w.index_copy_(
                piece.dim,
                piece.idxs.to(w.device),
                w.index_select(piece.dim, piece.idxs.to(w.device)) * factor.view(shape),
            )
