"""Training throughput (images/s) of a dense and a pruned model: prunelab's Lightning path against a raw
PyTorch loop on the same device, model, batch, optimizer and precision, measured side by side.

The pruned model is the dense one with `--keep` of every prunable channel group's channels (L1-norm
order), so the ratio shows what the framework costs per step and what pruning buys. Inputs are random
tensors already on the device (the data pipeline is not measured). On a GPU the steps are timed with
CUDA events, bf16 autocast (`--precision bf16-mixed`) and channels-last (`--channels-last`) are used
as `trainer=gpu` uses them, and `--compile` adds torch.compile to both paths.

    python benchmarks/bench_train.py [--backbone resnet56] [--batch 64] [--steps 10] [--keep 0.5]
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F

from prunelab.backbones import create
from prunelab.budget import count_flops
from prunelab.lit import PruneLitModule
from prunelab.structure import ChannelPlan, apply_channel_plan, channel_groups


class _Timer(L.Callback):
    """Wall time of the training steps after `warmup` (synchronised on CUDA)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, None, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lightning_rate(model, batches, args, device) -> float:
    module = PruneLitModule(
        model,
        num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        channels_last=args.channels_last,
        compile=args.compile,
    )
    timer = _Timer(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return args.steps * args.batch / timer.seconds


def raw_rate(model, batches, args, device) -> float:
    model = model.to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = args.precision.startswith("bf16")
    for index, (x, y) in enumerate(batches):
        if index == args.warmup:
            _sync()
            start = time.perf_counter()
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync()
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--channels-last", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    args.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    torch.manual_seed(0)
    shape = (3, 32, 32)
    batches = [
        (torch.randn(args.batch, *shape, device=device), torch.randint(0, 10, (args.batch,), device=device))
        for _ in range(args.warmup + args.steps)
    ]
    dense = create(args.backbone, num_classes=10)
    pruned = create(args.backbone, num_classes=10)
    pruned.load_state_dict(dense.state_dict())
    groups = channel_groups(pruned, shape)
    keep = {}
    for group in groups:
        layer = pruned.get_submodule(group.name)
        order = layer.weight.detach().flatten(1).abs().sum(1).argsort(descending=True).tolist()
        count = max(group.unit, round(args.keep * group.size / group.unit) * group.unit)
        keep[group.name] = sorted(order[:count]) if group.unit == 1 else list(range(count))
    apply_channel_plan(pruned, ChannelPlan(keep, {g.name: g.size for g in groups}), shape)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{args.backbone}, batch {args.batch}, {args.steps} timed steps after {args.warmup}, {args.precision}, "
        f"channels_last {args.channels_last}, compile {args.compile}, on {name}"
    )
    print("| model | MACs | prunelab (Lightning) img/s | raw PyTorch img/s | prunelab / raw |")
    print("|---|---|---|---|---|")
    rates = {}
    for label, model in (("dense", dense), (f"pruned (keep {args.keep:g})", pruned)):
        flops = count_flops(model, shape)
        ours = lightning_rate(model, batches, args, device)
        raw = raw_rate(model, batches, args, device)
        rates[label] = ours
        print(f"| {label} | {flops / 1e6:.1f}M | {ours:.0f} | {raw:.0f} | {ours / raw:.2f} |")
    dense_rate, pruned_rate = rates.values()
    print(f"pruned / dense training throughput through prunelab: {pruned_rate / dense_rate:.2f}x")


if __name__ == "__main__":
    main()
