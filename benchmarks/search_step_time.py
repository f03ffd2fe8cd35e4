"""Step time of the weight-frozen searches (PFS gates, SR-popup and edge-popup masks) against a dense training step.

Builds the backbone (ResNet-56 by default) and times, in interleaved rounds on the same random batch:

- `dense`: one SGD training step of the dense backbone (all weights trained);
- `pfs`: one Pruning-from-Scratch gate-search step as the method runs it (the x`expansion` random
  backbone, weights frozen, Adam on the gates, cross-entropy + gamma * (mean gate - r)^2, clamp),
  gating the inner channels of residual blocks as the ResNet presets do;
- `pfs_x1`: the same search on the unexpanded backbone, and `dense_wide` a dense step of the
  x`expansion` backbone: they separate the saving of not computing weight gradients from the cost of
  the wider network;
- `jackpot` and `edge_popup`: one mask-search step (weights frozen, SGD on the scores, the swaps of
  Eqs. 28-30 after the step), at `--sparsity`.

Ratios are between each kind's fastest round (noise only adds time). What the arithmetic allows: a dense step is three
passes (forward, input gradients, weight gradients). The gate search skips the weight gradients but runs a network
`expansion`^2 as large: about 2/3 * 1.25^2 = 1.04x at x1.25. The mask searches need the gradient of the masked weights
(that is the scores' gradient) and skip only the update of the weights: about 1.0x.

Usage: python benchmarks/search_step_time.py [--backbone resnet56] [--batch 128] [--steps 5] [--out FILE]
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
from prunelab.methods.jackpot import EdgePopup, Jackpot
from prunelab.methods.pfs import PruningFromScratch

SHAPE = (3, 32, 32)
Step = Callable[[torch.Tensor, torch.Tensor], None]


def dense_step(model: nn.Module) -> Step:
    """A plain training step: SGD with momentum on every parameter."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def method_step(method, model: nn.Module, optimizer: str = "adam") -> tuple[Step, nn.Module]:
    """A search step through the method's own hooks, as PruneLitModule calls them; returns it and the model."""
    model.prunelab.input_shape = SHAPE
    stage = next(s for s in method.stages() if s.kind == "fit")
    method.setup(model, stage, None)
    method.total_steps = 1000
    model.train()
    params = [p for p in method.parameters_to_train(model) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01) if optimizer == "adam" else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    count = [0]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        method.after_optimizer_step(model, count[0])
        count[0] += 1

    return step, model


def pfs_step(backbone: str, expansion: float) -> tuple[Step, nn.Module]:
    method = PruningFromScratch(expansion=expansion, ratio=0.5)
    return method_step(method, method.initial_model(create(backbone)))


def measure(
    backbone: str = "resnet56",
    batch: int = 128,
    steps: int = 5,
    expansion: float = 1.25,
    sparsity: float = 0.9,
    channels_last: bool = False,
) -> dict:
    """Median step seconds of each kind over `steps` interleaved rounds (after one warm-up round)."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, *SHAPE), torch.randint(0, 10, (batch,))
    if channels_last:
        # As trainer.channels_last runs them: the model's 4-D tensors and each batch in NHWC.
        x = x.contiguous(memory_format=torch.channels_last)
    kinds = {
        "dense": (dense_step(dense := create(backbone)), dense),
        "dense_wide": (dense_step(wide := create(backbone, width=expansion)), wide),
        "pfs": pfs_step(backbone, expansion),
        "pfs_x1": pfs_step(backbone, 1.0),
        "jackpot": method_step(Jackpot(sparsity=sparsity, epochs=1), create(backbone), "sgd"),
        "edge_popup": method_step(EdgePopup(sparsity=sparsity, epochs=1), create(backbone), "sgd"),
    }
    if channels_last:
        for _, model in kinds.values():
            if model is not None:
                model.to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in kinds}
    # Interleaved rounds, so that every kind sees the same machine load.
    for round_index in range(steps + 1):
        for name, (step, _) in kinds.items():
            start = time.perf_counter()
            step(x, y)
            elapsed = time.perf_counter() - start
            if round_index > 0:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    # Ratios from each kind's fastest step: the machine's noise only ever adds time.
    fastest = {name: min(values) for name, values in times.items()}
    # The property the searches rely on: frozen weights get no gradient at all.
    weight_grads = {
        name: sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
        for name, (_, model) in kinds.items()
        if not name.startswith("dense")
    }
    return {
        "backbone": backbone,
        "batch": batch,
        "expansion": expansion,
        "sparsity": sparsity,
        "channels_last": channels_last,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "step_s": times,
        "median_step_s": median,
        "fastest_step_s": fastest,
        "over_dense": {name: value / fastest["dense"] for name, value in fastest.items() if name != "dense"},
        "pfs_over_dense_wide": fastest["pfs"] / fastest["dense_wide"],
        "frozen_weights_with_grad": weight_grads,
    }


def report(result: dict) -> list[str]:
    """The result as printable lines: each kind's fastest step and rounds, and its ratio to the dense step."""
    layout = "channels_last" if result["channels_last"] else "NCHW"
    lines = [
        f"{result['backbone']}, batch {result['batch']}, {layout}, {result['threads']} threads, {result['steps']} "
        "rounds"
    ]
    for name, value in result["fastest_step_s"].items():
        rounds = ", ".join(f"{t:.3f}" for t in result["step_s"][name])
        ratio = "" if name == "dense" else f"  {result['over_dense'][name]:.3f}x dense"
        lines.append(f"{name:10s} fastest step {value:.3f} s{ratio}  (rounds: {rounds})")
    wide = f"x{result['expansion']:g}"
    lines.append(
        f"pfs / dense step at the same width ({wide}): {result['pfs_over_dense_wide']:.3f} (arithmetic: 0.667); "
        f"dense {wide} / dense: {result['over_dense']['dense_wide']:.3f} (FLOPs: {result['expansion'] ** 2:.3f})"
    )
    spread = max(statistics.median(v) / min(v) for v in result["step_s"].values())
    lines.append(f"noise: median / fastest round, worst kind {spread:.2f}")
    lines.append(f"frozen weights holding a gradient after the steps: {result['frozen_weights_with_grad']}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--expansion", type=float, default=1.25)
    parser.add_argument("--sparsity", type=float, default=0.9, help="of the mask searches")
    parser.add_argument("--channels-last", action="store_true", help="NHWC tensors, as trainer.channels_last=true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("outputs/search_step_time.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.backbone, args.batch, args.steps, args.expansion, args.sparsity, args.channels_last)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(report(result)))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
