"""Step time of the Pruning-from-Scratch gate search against a dense training step, side by side.

Builds the backbone (ResNet-56 by default) and times, in interleaved rounds on the same random batch:

- `dense`: one SGD training step of the dense backbone (all weights trained);
- `search`: one gate-search step as the method runs it (the x`expansion` random backbone, weights
  frozen, Adam on the gates, cross-entropy + gamma * (mean gate - r)^2, clamp), gating the inner
  channels of residual blocks as the ResNet presets do (`--prune-coupled` gates the residual streams too);
- `search_x1`: the same search step on the unexpanded backbone, which isolates the saving of not
  computing weight gradients from the cost of the wider network.

Usage: python scripts/pfs_step_time.py [--backbone resnet56] [--batch 128] [--steps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.backbones import create
from prunelab.methods.base import Stage
from prunelab.methods.pfs import PruningFromScratch

SHAPE = (3, 32, 32)


def dense_step(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A plain training step: SGD with momentum on every parameter."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def search_step(backbone: str, expansion: float, prune_coupled: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A gate-search step through the method's own hooks, as PruneLitModule calls them."""
    method = PruningFromScratch(expansion=expansion, ratio=0.5, prune_coupled=prune_coupled)
    model = method.initial_model(create(backbone))
    model.prunelab.input_shape = SHAPE
    method.setup(model, Stage("search", "fit"), None)
    model.train()
    optimizer = torch.optim.Adam([p for p in method.parameters_to_train(model) if p.requires_grad], lr=0.01)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + method.extra_loss(model)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, 0)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after one warm-up step)")
    parser.add_argument("--expansion", type=float, default=1.25)
    parser.add_argument("--prune-coupled", action="store_true", help="also gate channels shared by residual additions")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("outputs/pfs_step_time.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, *SHAPE), torch.randint(0, 10, (args.batch,))
    steps = {
        "dense": dense_step(create(args.backbone)),
        "search": search_step(args.backbone, args.expansion, args.prune_coupled),
        "search_x1": search_step(args.backbone, 1.0, args.prune_coupled),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    # One warm-up step each, then interleaved rounds so that all kinds see the same machine load.
    for round_index in range(args.steps + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x, y)
            elapsed = time.perf_counter() - start
            if round_index > 0:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "backbone": args.backbone,
        "batch": args.batch,
        "expansion": args.expansion,
        "prune_coupled": args.prune_coupled,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "step_s": times,
        "median_step_s": median,
        "search_over_dense": median["search"] / median["dense"],
        "search_x1_over_dense": median["search_x1"] / median["dense"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, value in median.items():
        print(f"{name:10s} median step {value:.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"search / dense step time: {result['search_over_dense']:.3f} (x{args.expansion:g} search network)")
    print(f"search / dense step time at equal width: {result['search_x1_over_dense']:.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
