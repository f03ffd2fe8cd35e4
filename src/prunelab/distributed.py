"""Data-parallel runs that give the single-process answer.

Under `trainer=ddp` every rank runs the whole pipeline (Lightning launches the other ranks when the
first fit starts; they find the stages done before it on disk). What makes N ranks equal one process
trained on the same global batch:

- `dataset.batch_size` is the GLOBAL batch: `ShardedBatches` cuts each global batch of the
  single-process order into one slice per rank (rank r takes positions r, r + N, ...), so the ranks
  together see exactly the single process's batches, with nothing padded or repeated;
- the training loss is scaled so that DDP's gradient average is the mean over the whole global batch
  (`global_mean`), also when the last batch does not split evenly;
- BatchNorm normalises with the statistics of the global batch (`sync_batchnorm`, on CPU too, where
  torch's SyncBatchNorm refuses to run);
- validation and test split the samples without padding (`Shard`), and every metric sums its states
  over ranks (torchmetrics), so each sample counts exactly once;
- plans are computed on every rank from the same weights and the same (unsharded) batches, and
  `check_same` fails loudly if two ranks disagree; only global rank 0 writes files (`prunelab.io`).
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedBatches(Sampler[list[int]]):
    """Rank `rank`'s part of every global batch of `sampler`'s order: positions rank, rank + world, ...

    A final global batch with fewer samples than ranks is left out (a rank must not get an empty
    batch); `left_out` says how many samples that dropped.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[self.rank :: self.world_size]
                batch = []
        if len(batch) >= self.world_size:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        size = len(self.sampler)  # type: ignore[arg-type]
        return size // self.batch_size + (size % self.batch_size >= self.world_size)

    @property
    def left_out(self) -> int:
        rest = len(self.sampler) % self.batch_size  # type: ignore[arg-type]
        return rest if rest < self.world_size else 0


class Shard(Sampler[int]):
    """Positions rank, rank + world, ... of `size` in order: every sample on exactly one rank, none padded."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def global_mean(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, mean over the global batch) for this rank's per-sample losses.

    DDP averages the ranks' gradients; with N ranks and G samples in the global batch, the loss
    N * sum_local / G makes that average the gradient of the global batch's mean. The second value
    (detached) is the global batch's mean itself, the same on every rank.
    """
    _rank, size = world()
    if size == 1:
        mean = per_sample.mean()
        return mean, mean.detach()
    stats = torch.stack(
        [per_sample.detach().sum().double(), per_sample.new_tensor(per_sample.numel(), dtype=torch.float64)]
    )
    dist.all_reduce(stats)
    total = stats[1].to(per_sample.dtype)
    return per_sample.sum() * size / total, (stats[0] / stats[1]).to(per_sample.dtype)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (the gradient is summed over ranks too)."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # Its successor (functional collectives) is not differentiable on every backend yet.
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor)


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the global batch: mean, then variance, each summed over ranks (two passes, as torch)."""
    _rank, size = world()
    if not self.training or size == 1:
        return type(self).forward(self, x)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])])
    total = _all_reduce(local)
    count = total[-1]
    mean = total[:-1] / count
    centred = x - mean.view(shape)
    var = _all_reduce((centred * centred).sum(dims)) / count
    if self.track_running_stats and self.running_mean is not None:
        # torch keeps all three buffers when it tracks running statistics.
        assert self.running_var is not None and self.num_batches_tracked is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = float(count)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(n - 1, 1.0), alpha=momentum)
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out


@contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[None]:
    """While active, every BatchNorm of `model` normalises training batches with global-batch statistics.

    The layers stay what they are (pruning and export see plain BatchNorm); their `forward` is replaced
    on the instance and restored afterwards. Outside a process group of several ranks, or in eval
    mode, they run torch's own BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        # Replaced on this instance on purpose (restored below), which mypy refuses for a method.
        norm.forward = types.MethodType(_synced_forward, norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


def fingerprint(obj: Any) -> str:
    """A short hash of a plan (its kept channels or its masks), a model's state or a tensor, to compare ranks."""
    digest = hashlib.sha256()
    if hasattr(obj, "masks") and isinstance(obj.masks, dict):  # a MaskPlan
        for name, mask in sorted(obj.masks.items()):
            digest.update(name.encode())
            digest.update(mask.detach().cpu().contiguous().numpy().tobytes())
    elif hasattr(obj, "to_dict"):  # a ChannelPlan
        import json

        digest.update(json.dumps(obj.to_dict(), sort_keys=True).encode())
    elif isinstance(obj, torch.Tensor):
        digest.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, nn.Module):
        for name, tensor in obj.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    else:
        import json

        digest.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def check_same(what: str, obj: Any) -> None:
    """Raise if the ranks of the process group hold different `obj` (compared by `fingerprint`)."""
    _rank, size = world()
    if size == 1:
        return
    mine = fingerprint(obj)
    found: list[Any] = [None] * size
    dist.all_gather_object(found, mine)
    if len(set(found)) != 1:
        raise RuntimeError(
            f"DDP ranks disagree on {what} (fingerprints by rank: {found}); the ranks no longer compute "
            f"the same run (a nondeterministic criterion, or data that differ between ranks)"
        )
