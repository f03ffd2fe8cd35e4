"""Latency speedup next to FLOPs reduction for structurally pruned CIFAR ResNet-56 (and any backbone).

Prunes the backbone to each FLOPs budget with filter-L1 (global threshold) and with a uniform width,
then measures, in the same process and interleaved with the dense model, the median eval-mode forward
time at each batch size. Run: `python scripts/bench_latency.py [--backbone resnet56] [--flops 0.5 0.25]`.
"""

from __future__ import annotations

import argparse
import copy
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

from prunelab.backbones import create
from prunelab.budget import count_flops, count_params, latency
from prunelab.methods.baselines import L1Filter, Uniform
from prunelab.structure import apply_channel_plan

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = (3, 32, 32)
    weights = next(SHARED_WEIGHTS.glob(f"{args.backbone}-*.th"), None) if SHARED_WEIGHTS.exists() else None
    dense = create(args.backbone, pretrained=str(weights) if weights else None).eval()
    dense_flops, dense_params = count_flops(dense, shape), count_params(dense)
    print(f"{args.backbone}: {dense_flops / 1e6:.1f}M MACs, {dense_params / 1e6:.3f}M params, "
          f"weights: {weights.name if weights else 'random init'}, torch threads: {args.threads}")

    models = {"dense": dense}
    for target in args.flops:
        budget = OmegaConf.create({"flops": target, "tolerance": 0.03, "iterations": 30, "round_to": 1})
        ctx = types.SimpleNamespace(budget=budget, input_shape=shape, dense={"flops": dense_flops})
        for name, method in (("l1_filter", L1Filter()), ("uniform", Uniform())):
            pruned = copy.deepcopy(dense)
            apply_channel_plan(pruned, method.plan(pruned, ctx), shape)
            models[f"{name}@{target:g}"] = pruned.eval()

    # Two interleaved rounds so that machine noise affects all models alike; report the faster round.
    times = {name: {b: float("inf") for b in args.batch_sizes} for name in models}
    for _ in range(2):
        for name, model in models.items():
            for b in args.batch_sizes:
                times[name][b] = min(times[name][b], latency(model, shape, b, "cpu", warmup=3, repeats=args.repeats))

    header = f"{'model':>16} {'MACs':>9} {'FLOPs x':>8} {'params x':>9}" + "".join(
        f" {'b' + str(b) + ' ms':>10} {'speedup':>8}" for b in args.batch_sizes
    )
    print(header)
    for name, model in models.items():
        flops = count_flops(model, shape)
        row = f"{name:>16} {flops / 1e6:8.1f}M {dense_flops / flops:8.2f} {dense_params / count_params(model):9.2f}"
        for b in args.batch_sizes:
            row += f" {times[name][b]:10.2f} {times['dense'][b] / times[name][b]:8.2f}"
        print(row)


if __name__ == "__main__":
    main()
