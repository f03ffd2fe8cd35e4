"""One command for prunelab's speed figures, each measured side by side in one run.

    python benchmarks/bench.py                       # everything (about 15 min on 2 CPU cores, ../shared for `budget`)
    python benchmarks/bench.py --only surgery deployed round_to

Sections (`--only`):
- `surgery`: CIFAR ResNet-56 pruned to a uniform half width (a quarter of the FLOPs) against the same
  narrow network built natively, eager, batch 1 and 64: what the surgery itself costs.
- `deployed`: dense vs pruned (filter-L1 to `--flops` of the FLOPs, pretrained weights from ../shared
  when present) in every deployed form: eager, frozen TorchScript (BatchNorm folded, then
  `torch.jit.optimize_for_inference`), ONNX under onnxruntime, and `torch.compile` on a GPU (or with
  `--compile`); speedups at batch 1 and 64.
- `round_to`: filter-L1 to half the FLOPs with `budget.round_to` 1, 4, 8, 16: deployed latency at
  (nearly) equal FLOPs.
- `search`: the PFS gate-search step and the SR-popup / edge-popup mask-search steps against a dense
  training step, in NCHW and in channels-last layout (`benchmarks/search_step_time.py`), and the FLOPs-threshold
  search's seconds (`benchmarks/flops_search.py`).
- `budget`: on the shared CIFAR-10 subset and pretrained ResNet-56, `budget.latency` (ranking by
  importance, and per millisecond) against a FLOPs budget chosen to give the same measured latency (all
  filter-L1, fine-tuned identically): latency reached, FLOPs, accuracy right after pruning and after
  fine-tuning. Runs the `prunelab` pipeline in this process.

Timings are medians of repeated calls (`--repeats`, at least 0.3 s of calls each); models are timed in
interleaved rounds (`--rounds`) and each keeps its fastest round, so machine noise hits all alike. The
spread between rounds is printed as the noise. On CUDA, time_call synchronises around each call.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunelab
from prunelab.backbones import create
from prunelab.budget import count_flops, deployed, latency_device, time_call
from prunelab.errors import BudgetError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAPE = (3, 32, 32)
SECTIONS = ("surgery", "deployed", "round_to", "search", "budget")


def weights(backbone: str) -> str | None:
    found = sorted((SHARED / "weights" / "cifar10").glob(f"{backbone}-*.th"))
    return str(found[0]) if found else None


def pruned(
    model, flops: float, round_to: int = 1, tolerance: float = 0.01, method: str = "l1_filter", iterations: int = 30
):
    """`model` pruned by `method` to `flops` of its FLOPs with `prunelab.prune` (no data, so no retraining), in eval
    mode."""
    budget = {"flops": flops, "tolerance": tolerance, "iterations": iterations, "round_to": round_to}
    with tempfile.TemporaryDirectory() as run_dir:
        return prunelab.prune(
            model, method, budget, torch.randn(1, *SHAPE), overrides=["quiet=true"], run_dir=run_dir
        ).model.eval()


def interleaved(forms: dict[str, object], batches: list[int], args) -> dict[tuple[str, int], tuple[float, float]]:
    """(fastest round, second fastest) in ms of each callable at each batch size, rounds interleaved."""
    device = latency_device(args.device)
    inputs = {b: torch.randn(b, *SHAPE, device=device) for b in batches}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in forms.items():
            for b in batches:
                times.setdefault((name, b), []).append(
                    time_call(fn, inputs[b], warmup=3, repeats=args.repeats, seconds=0.3)
                )
    return {key: tuple(sorted(v)[:2]) if len(v) > 1 else (v[0], v[0]) for key, v in times.items()}


def noise(times: dict) -> str:
    spread = [hi / lo - 1 for lo, hi in times.values()]
    return (
        f"noise: the two fastest rounds differ by {100 * sum(spread) / len(spread):.1f}% on average, "
        f"at most {100 * max(spread):.1f}%"
    )


def surgery(args) -> None:
    dense = create(args.backbone).eval()
    narrow = pruned(dense, 0.25, tolerance=0.02, method="uniform", iterations=40)
    native = create(args.backbone, width=0.5).eval()
    forms = {
        "pruned": deployed(narrow, SHAPE, "eager", args.device),
        "native": deployed(native, SHAPE, "eager", args.device),
    }
    times = interleaved(forms, [1, 64], args)
    print(f"\n## surgery: {args.backbone} pruned to a uniform width of 1/2 vs built at width 1/2 (eager)")
    print(f"FLOPs: pruned {count_flops(narrow, SHAPE) / 1e6:.2f}M, native {count_flops(native, SHAPE) / 1e6:.2f}M")
    for b in (1, 64):
        p, n = times[("pruned", b)][0], times[("native", b)][0]
        print(f"batch {b:>2}: pruned {p:.2f} ms, native {n:.2f} ms, pruned / native = {p / n:.3f}")
    print(noise(times))


def deployed_forms(model, args) -> dict[str, object]:
    forms = {fmt: deployed(model, SHAPE, fmt, args.device) for fmt in ("eager", "torchscript_frozen", "onnx")}
    if args.compile or latency_device(args.device).type == "cuda":
        forms["compile"] = torch.compile(deployed(model, SHAPE, "eager", args.device))
    return forms


def deployed_section(args) -> None:
    dense = create(args.backbone, pretrained=weights(args.backbone)).eval()
    small = pruned(dense, args.flops)
    forms = {}
    for tag, model in (("dense", dense), ("pruned", small)):
        forms.update({(tag, fmt): fn for fmt, fn in deployed_forms(model, args).items()})
    times = interleaved({f"{t}|{f}": fn for (t, f), fn in forms.items()}, [1, 64], args)
    ratio = count_flops(small, SHAPE) / count_flops(dense, SHAPE)
    print(
        f"\n## deployed: {args.backbone} dense vs filter-L1 to {ratio:.3f} of the FLOPs ({1 / ratio:.2f}x fewer), "
        f"{latency_device(args.device)}, {torch.get_num_threads()} threads"
    )
    print(
        "| form | batch 1: dense ms | pruned ms | speedup | dense vs eager dense | batch 64: dense ms | pruned ms | "
        "speedup | dense vs eager dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in [f for f in ("eager", "torchscript_frozen", "onnx", "compile") if ("dense", f) in forms]:
        row = f"| {fmt} |"
        for b in (1, 64):
            d, p, e = times[(f"dense|{fmt}", b)][0], times[(f"pruned|{fmt}", b)][0], times[("dense|eager", b)][0]
            row += f" {d:.2f} | {p:.2f} | {d / p:.2f}x | {e / d:.2f}x faster |"
        print(row)
    print(noise(times))


def round_to_section(args) -> None:
    dense = create(args.backbone, pretrained=weights(args.backbone)).eval()
    models = {}
    for r in (1, 4, 8, 16):
        models[r] = pruned(dense, 0.5, r, tolerance=0.1)
    forms = {
        f"{r}|{fmt}": fn for r, m in models.items() for fmt, fn in deployed_forms(m, args).items() if fmt != "eager"
    }
    forms.update({f"dense|{fmt}": fn for fmt, fn in deployed_forms(dense, args).items() if fmt != "eager"})
    times = interleaved(forms, [1, 64], args)
    fmts = sorted({k.split("|")[1] for k in forms})
    print(f"\n## round_to: {args.backbone} filter-L1 to half the FLOPs, kept channels rounded up to multiples of r")
    print("| round_to | FLOPs kept | " + " | ".join(f"{f} b{b} ms (speedup)" for f in fmts for b in (1, 64)) + " |")
    print("|---|---|" + "---|" * (2 * len(fmts)))
    dense_flops = count_flops(dense, SHAPE)
    for r, m in models.items():
        cells = [
            f"{times[(f'{r}|{f}', b)][0]:.2f} ({times[(f'dense|{f}', b)][0] / times[(f'{r}|{f}', b)][0]:.2f}x)"
            for f in fmts
            for b in (1, 64)
        ]
        print(f"| {r} | {count_flops(m, SHAPE) / dense_flops:.3f} | " + " | ".join(cells) + " |")
    print(noise(times))


def search_section(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flops_search
    import search_step_time

    for channels_last in (False, True):
        layout = "channels_last (trainer.channels_last=true)" if channels_last else "NCHW"
        print(f"\n## search steps against a dense training step (batch 128, interleaved, {layout})")
        result = search_step_time.measure(args.backbone, steps=args.steps, channels_last=channels_last)
        for line in search_step_time.report(result):
            print(line)
    print("\n## FLOPs-threshold search (half the FLOPs, L1 scores)")
    flops_search.main()


def run(run_dir: Path, overrides: list[str]) -> dict:
    """The run `prunelab <overrides> hydra.run.dir=<run_dir>` makes, in this process: its summary."""
    print("prunelab", *overrides, f"hydra.run.dir={run_dir}", flush=True)
    return prunelab.run(overrides, run_dir)


def budget_section(args) -> None:
    pretrained = weights("resnet56")
    data = SHARED / "data" / "cifar-10-subset"
    if pretrained is None or not data.exists():
        print("\n## budget: skipped (needs ../shared: the CIFAR-10 subset and the pretrained ResNet-56)")
        return
    common = [
        "dataset=cifar10", f"dataset.root={data}", "dataset.val_size=500", "dataset.num_workers=0",
        "dataset.batch_size=128", "backbone=resnet56", f"backbone.pretrained={pretrained}", "retrain=finetune",
        f"retrain.epochs={args.finetune_epochs}", "optimizer.lr=0.01", "scheduler=constant", "test_pruned=true",
        "latency.batch_sizes=[]", "method=l1_filter", "trainer.enable_progress_bar=false", "quiet=true",
        f"budget.latency_batch_size={args.latency_batch}", f"budget.latency_device={args.device}",
        "budget.latency_format=torchscript_frozen", f"budget.round_to={args.round_to}",
    ]  # fmt: skip
    out = args.out / "budget"
    shutil.rmtree(out, ignore_errors=True)  # a run directory left by an earlier bench would be resumed, not rerun
    start = time.perf_counter()
    by_latency = run(out / "latency", [*common, f"budget.latency={args.latency}"])
    print(f"latency-budget run: {time.perf_counter() - start:.0f} s")
    try:
        per_ms = run(
            out / "latency_per_ms", [*common, f"budget.latency={args.latency}", "budget.latency_ranking=per_ms"]
        )
    except BudgetError as err:
        print(f"latency_per_ms: {err}")
        per_ms = None  # the table says it failed
    # The FLOPs budget whose filter-L1 model has the latency of the latency-budget model, timed side by side.
    dense = create("resnet56", pretrained=pretrained).eval()
    goal = deployed(load(out / "latency"), SHAPE, "torchscript_frozen", args.device)
    lo, hi, flops = 0.05, 1.0, by_latency["model/flops_ratio"]
    for _ in range(10):
        # The model the run with budget.flops=flops prunes before fine-tuning.
        candidate = deployed(pruned(dense, flops, args.round_to), SHAPE, "torchscript_frozen", args.device)
        times = interleaved({"goal": goal, "candidate": candidate}, [args.latency_batch], args)
        got = times[("candidate", args.latency_batch)][0] / times[("goal", args.latency_batch)][0]
        print(f"FLOPs budget {flops:.4f}: {got:.3f} x the latency of the latency-budget model", flush=True)
        if abs(got - 1) <= 0.03:
            break
        lo, hi = (flops, hi) if got < 1 else (lo, flops)
        flops = (lo + hi) / 2
    by_flops = run(out / "flops", [*common, f"budget.flops={flops!r}"])
    # Both final models timed again side by side, with the dense one.
    runs = {"latency": by_latency, "latency_per_ms": per_ms, "flops": by_flops}
    models = {"dense": dense, **{name: load(out / name) for name, summary in runs.items() if summary is not None}}
    forms = {name: deployed(m, SHAPE, "torchscript_frozen", args.device) for name, m in models.items()}
    times = interleaved(forms, [args.latency_batch], args)
    print(
        f"\n## budget: ResNet-56 on the CIFAR-10 subset, budget.latency={args.latency} (frozen TorchScript, batch "
        f"{args.latency_batch}, round_to {args.round_to}) vs a FLOPs budget at the same latency, all filter-L1, "
        f"fine-tuned {args.finetune_epochs} epochs"
    )
    print(
        "| budget | FLOPs kept | latency kept (in its run) | latency kept (re-timed side by side) | after pruning (%) "
        "| after fine-tuning (%) |"
    )
    print("|---|---|---|---|---|---|")
    for name, summary in runs.items():
        if summary is None:
            print(f"| {name} | the run failed: its budget was not met (error above) | | | | |")
            continue
        in_run = summary.get("model/latency_ratio")
        side = times[(name, args.latency_batch)][0] / times[("dense", args.latency_batch)][0]
        print(
            f"| {name} | {summary['model/flops_ratio']:.3f} | {in_run if in_run is None else f'{in_run:.3f}'} | "
            f"{side:.3f} | {summary['pruned/test/acc']:.2f} | {summary['test/acc']:.2f} |"
        )
    print(f"dense: {by_latency['dense/test/acc']:.2f}%; {noise(times)}")


def load(run_dir: Path):
    return prunelab.load_model(run_dir / "model.pt").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backbone", default="resnet56")
    parser.add_argument("--flops", type=float, default=0.25, help="FLOPs kept by the pruned model of `deployed`")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round of the search-step section")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the CPU")
    parser.add_argument("--latency", type=float, default=0.7, help="budget.latency of the `budget` section")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--round-to", type=int, default=4, help="budget.round_to of the `budget` section's runs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    print(
        f"prunelab bench: torch {torch.__version__}, {latency_device(args.device)}, {torch.get_num_threads()} threads"
    )
    sections = {
        "surgery": surgery,
        "deployed": deployed_section,
        "round_to": round_to_section,
        "search": search_section,
        "budget": budget_section,
    }
    for name in args.only:
        start = time.perf_counter()
        sections[name](args)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
