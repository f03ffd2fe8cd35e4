"""Zoo benchmark: structured pruning of many classification models, prunelab next to Torch-Pruning.

For each model (random weights, 10 classes) two paths run, each in its own subprocess with a time
limit, so that a crash, a hang or a memory blow-up costs one row and not the run:

- prunelab: `prunelab.backbones.create`, group discovery (`channel_groups`, timed once on its own), then
  `prunelab.prune(model, "l1_filter", {"flops": 0.5})`: the pipeline's pre-training check (a refusal names the
  layers), an L1-filter plan to half the dense FLOPs (global threshold search), the surgery, the deployable export
  (frozen TorchScript) and the saved model;
  then `prunelab.load_model` of the saved file alone and a check that it gives the outputs of the model pruned
  in memory by the same plan (torch.allclose, atol = rtol = 1e-4) on a random batch of 2.
- Torch-Pruning: the same architecture built by torchvision or timm directly, `MetaPruner` with
  `MagnitudeImportance(p=1)`, local (per-group) pruning, every layer with 10 outputs (the
  classifier) ignored; the uniform pruning ratio is bisected (each try on a fresh copy) until the
  FLOPs ratio is within 2% of 0.5, or the closest try is kept. Then one forward pass.

Each path reports ok or the step that failed with the exception's type and first line, the FLOPs
ratio reached (each library's own counter: prunelab counts every convolution and matrix product,
Torch-Pruning's counter hooks layers, so e.g. attention products differ), seconds after the model is
built (search included), and the peak RSS above the RSS of the built model (in the CSV also the peak until
the channel groups are found, `pl_groups_peak_gb`, which bounds group discovery's). The input is the
model's own default size (timm's `pretrained_cfg`, else 224) unless `--size` is given.

Rows print as each model finishes and go to a Markdown file (`--out`, default zoo.md) and a CSV
next to it (zoo.csv); the run ends with a summary (counts, FLOPs range, the largest times and memory with
their models) and a compact grid for docs/any-model.md, which `--summary zoo.csv` prints again from a CSV
(also from a run that was cut short). The default list (all torchvision classifiers and ~150 timm models, one or two
per family) takes hours on a few CPU cores. Run:

    python benchmarks/zoo.py
    python benchmarks/zoo.py --models torchvision:resnet18,timm:ghostnet_100
    python benchmarks/zoo.py --only timm --limit 10 --skip-tp
    python benchmarks/zoo.py --summary zoo.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_CLASSES = 10
TARGET = 0.5  # fraction of the dense FLOPs to keep
TOLERANCE = 0.02  # relative, for both libraries
TP_TRIES = 8  # bisection steps of Torch-Pruning's uniform ratio, in [0, TP_MAX_RATIO]
TP_MAX_RATIO = 0.6
STEP_MARK, RESULT_MARK = "ZOO-STEP ", "ZOO-RESULT "

# One or two small members of each plain image-classifier family of timm.
TIMM_MODELS = """
resnet18 resnet50 resnext50_32x4d seresnext26d_32x4d regnetx_002 regnety_004 efficientnet_b0
mobilenetv3_small_100 mobilenetv2_100 ghostnet_100 mixnet_s cspresnet50 cspdarknet53 res2net50_14w_8s
dla34 densenet121 dpn68 hrnet_w18_small inception_v3 xception41 rexnet_100 tinynet_a lcnet_050
convnext_atto convnextv2_atto poolformer_s12 vit_tiny_patch16_224 deit_tiny_patch16_224
swin_tiny_patch4_window7_224 levit_128s mobilevit_xxs efficientformer_l1 coat_lite_tiny pit_ti_224
cait_xxs24_224 crossvit_tiny_240 twins_svt_small convit_tiny resmlp_12_224 mixer_s16_224 gmlp_ti16_224
repvgg_a0 vgg11_bn nfnet_l0 edgenext_xx_small fastvit_t8 efficientvit_b0 tresnet_m
beit_base_patch16_224 eva02_tiny_patch14_224 deit3_small_patch16_224 flexivit_small volo_d1_224
xcit_nano_12_p16_224 nest_tiny sequencer2d_s focalnet_tiny_srf davit_tiny gcvit_xxtiny hiera_tiny_224 hgnet_tiny
inception_next_tiny mambaout_femto mvitv2_tiny nextvit_small pvt_v2_b0 rdnet_tiny repghostnet_050 repvit_m0_9
resnest14d selecsls42b seresnet18 skresnet18 starnet_s1 swinv2_cr_tiny_224 swinv2_tiny_window8_256
tnt_s_patch16_224 ese_vovnet19b_dw visformer_tiny ghostnetv2_100 efficientnetv2_rw_t fasternet_t0 hgnetv2_b0
mobilenetv4_conv_small mobileone_s0 convmixer_768_32 dla46_c vitamin_small_224 regnetv_040 resnetv2_50
bat_resnext26ts halonet26t lambda_resnet26t sebotnet33ts_256 eca_nfnet_l0 vit_relpos_small_patch16_224
vit_srelpos_small_patch16_224 vit_base_patch16_rope_reg1_gap_256 efficientvit_m0 fastvit_mci0 coatnet_0_rw_224
maxvit_tiny_rw_224 maxxvit_rmlp_nano_rw_256 coat_tiny crossvit_9_240 poolformerv2_s12 convformer_s18 caformer_s18
res2next50 resnext26ts cs3darknet_s dm_nfnet_f0 vgg11 mnasnet_small spnasnet_100 fbnetc_100 semnasnet_050
mixnet_m tf_mixnet_s hardcorenas_a gernet_s legacy_seresnet18 inception_v4 inception_resnet_v2 xception65
pit_xs_distilled_224 edgenext_small_rw rexnetr_100 ghostnetv3_050 shvit_s1 mobilenetv5_300m_enc
levit_conv_128s efficientformerv2_s0 tiny_vit_5m_224 twins_pcpvt_small mobilevitv2_050 botnet26t_256
cpubone_t0 csatv2 cspnext_tiny efficientvim_m1 iformer_t lcnetv2_small lowformer_b0 swiftformer_xs
vit_small_r26_s32_224 legacy_xception naflexvit_base_patch16_gap hieradet_small samvit_base_patch16_224
nasnetalarge pnasnet5large
""".split()

COLUMNS = [
    ("model", "model"),
    ("size", "size"),
    ("pl_status", "prunelab"),
    ("pl_flops_ratio", "pl flops"),
    ("pl_groups_s", "pl groups s"),
    ("pl_total_s", "pl total s"),
    ("pl_peak_gb", "pl peak GB"),
    ("tp_status", "torch-pruning"),
    ("tp_flops_ratio", "tp flops"),
    ("tp_total_s", "tp s"),
    ("tp_peak_gb", "tp peak GB"),
]
CSV_ONLY = ["pl_max_diff", "pl_groups_peak_gb", "tp_pruning_ratio"]


# --- worker side: one path on one model, in a subprocess -------------------------------------------


def step(result: dict, name: str) -> None:
    """Mark the step now running, for the failure message and for the parent if it has to kill us."""
    result["step"] = name
    print(STEP_MARK + name, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def input_shape(model, size: int | None) -> tuple[int, int, int]:
    if size:
        return (3, size, size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def prunelab_path(name: str, size: int | None, result: dict) -> None:
    import torch

    import prunelab
    from prunelab.backbones import create
    from prunelab.budget import count_flops
    from prunelab.structure import apply_channel_plan, channel_groups

    step(result, "build")
    model = create(name, num_classes=NUM_CLASSES).eval()
    shape = input_shape(model, size)
    result.update(size=shape[-1], model_rss=rss_bytes(), start=time.perf_counter())

    step(result, "flops")
    count_flops(model, shape)
    step(result, "groups")
    start = time.perf_counter()
    channel_groups(model, shape)
    result["groups_s"] = time.perf_counter() - start
    # The peak until the groups are found (the FLOPs count's forward pass included): an upper bound for discovery.
    result["groups_peak_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - result["model_rss"]) / 1e9
    budget = {"flops": TARGET, "tolerance": TOLERANCE, "iterations": 30, "prune_coupled": True}
    with tempfile.TemporaryDirectory() as tmp:
        # The API's whole path: the pre-training check (a refusal names the layers), the plan, the surgery, the saved
        # model.
        step(result, "prune")
        pruned = prunelab.prune(
            model,
            "l1_filter",
            budget,
            torch.randn(1, *shape),
            num_classes=NUM_CLASSES,
            overrides=["quiet=true"],
            run_dir=tmp,
        )
        result["flops_ratio"] = pruned.report["model/flops_ratio"]
        step(result, "load")
        reloaded = prunelab.load_model(Path(tmp) / "model.pt").eval()  # from the file alone, without the model's class
    step(result, "apply")
    apply_channel_plan(model, pruned.plan, shape)
    step(result, "compare")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected, actual = model(x), reloaded(x)
    result["max_diff"] = (expected - actual).abs().max().item()
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"reloaded model's outputs differ, max abs diff {result['max_diff']:.3g}")


def build_plain(name: str):
    """The model as torchvision or timm build it, without prunelab."""
    library, _, model_name = name.partition(":")
    if library == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    return torchvision.models.get_model(model_name, weights=None, num_classes=NUM_CLASSES)


def tp_prune(model, ratio: float, example):
    """A copy of `model` pruned by Torch-Pruning's magnitude pruner at a uniform ratio."""
    import torch_pruning as tp
    from torch import nn

    pruned = copy.deepcopy(model)
    classifiers = [
        m
        for m in pruned.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=classifiers,
    )
    pruner.step()
    return pruned


def tp_path(name: str, size: int | None, result: dict) -> None:
    import torch
    import torch_pruning as tp

    step(result, "build")
    model = build_plain(name).eval()
    shape = input_shape(model, size)
    result.update(size=shape[-1], model_rss=rss_bytes(), start=time.perf_counter())
    example = torch.randn(1, *shape)

    step(result, "flops")
    dense, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, TP_MAX_RATIO, None
    for _ in range(TP_TRIES):
        ratio = (lo + hi) / 2
        step(result, "prune")
        pruned = tp_prune(model, ratio, example)
        step(result, "pruned flops")
        flops = tp.utils.count_ops_and_params(pruned, example)[0] / dense
        if best is None or abs(flops - TARGET) < abs(best[1] - TARGET):
            best = (pruned, flops, ratio)
        if abs(flops - TARGET) / TARGET <= TOLERANCE:
            break
        lo, hi = (ratio, hi) if flops > TARGET else (lo, ratio)
        del pruned
    pruned, result["flops_ratio"], result["pruning_ratio"] = best

    step(result, "forward")
    with torch.no_grad():
        out = pruned.eval()(torch.randn(2, *shape))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, NUM_CLASSES):
        raise ValueError(f"unexpected output {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")


def one_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def worker(path: str, name: str, size: int | None) -> None:
    import torch

    torch.manual_seed(0)
    result: dict = {"status": "ok"}
    try:
        (prunelab_path if path == "prunelab" else tp_path)(name, size, result)
    except Exception as err:  # noqa: BLE001 - any failure is one row's result
        result["status"] = one_line(f"{result.get('step', '?')}: {type(err).__name__}: {one_line(str(err), 1000)}")
    if "start" in result:
        result["total_s"] = time.perf_counter() - result.pop("start")
    if "model_rss" in result:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        result["peak_gb"] = (peak - result.pop("model_rss")) / 1e9
    result.pop("step", None)
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- parent side: the model list, subprocesses, the table ------------------------------------------


def run_worker(path: str, name: str, size: int | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--models", name]
    if size:
        cmd += ["--size", str(size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr, rc = "", None
    last_step = "start"
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
        if line.startswith(STEP_MARK):
            last_step = line[len(STEP_MARK) :]
    if rc is None:
        reason = f"timed out after {timeout:g} s"
    elif rc < 0:
        reason = f"killed by {signal.Signals(-rc).name}" + (" (out of memory?)" if rc == -signal.SIGKILL else "")
    else:
        reason = f"exit code {rc}: {one_line(stderr.strip().splitlines()[-1] if stderr.strip() else '')}"
    return {"status": one_line(f"{last_step}: {reason}")}


def default_models(only: str | None) -> tuple[list[str], list[str]]:
    """All torchvision classifiers and the timm list; and the timm names this timm does not know."""
    names, unknown = [], []
    if only in (None, "torchvision"):
        import torchvision

        names += [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if only in (None, "timm"):
        import timm

        names += [f"timm:{n}" for n in TIMM_MODELS if timm.is_model(n)]
        unknown = [n for n in TIMM_MODELS if not timm.is_model(n)]
    return names, unknown


def cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("_s") else f"{value:.2f}" if key.endswith("_gb") else f"{value:.3f}"
    return str(value).replace("|", "\\|")


def summary(rows: list[dict], per_line: int = 4) -> list[str]:
    """prunelab's path over a run's rows (as written to the CSV): counts, ranges and maxima naming their models, and
    a compact grid (FLOPs kept / seconds / peak GB per model; the status where it is not ok), for docs/any-model.md."""

    def number(row: dict, key: str) -> float | None:
        value = row.get(key)
        return None if value in (None, "") else float(value)

    def short(name: str) -> str:
        return name.split(":", 1)[-1]

    ok = [row for row in rows if row.get("pl_status") == "ok"]
    tp = [row for row in rows if row.get("tp_status") not in (None, "", "skipped")]
    lines = [f"prunelab: {len(ok)} ok / {len(rows)}"]
    if tp:
        lines.append(f"torch-pruning: {sum(row['tp_status'] == 'ok' for row in tp)} ok / {len(tp)}")
    if ok:
        flops = [number(row, "pl_flops_ratio") for row in ok]
        lines[0] += f"; FLOPs kept {min(flops):.3f}-{max(flops):.3f}"
        for key, what, unit in [
            ("pl_groups_s", "group discovery", "s"),
            ("pl_groups_peak_gb", "group discovery", "GB"),
            ("pl_total_s", "the whole path", "s"),
            ("pl_peak_gb", "the whole path", "GB"),
            ("pl_max_diff", "reloaded vs in memory, max abs difference", ""),
        ]:
            known = [row for row in ok if number(row, key) is not None]
            if known:
                top = max(known, key=lambda row: number(row, key))
                value = number(top, key)
                shown = f"{value:.3g}" if not unit else f"{value:.2f} GB" if unit == "GB" else f"{value:.1f} s"
                lines.append(f"{what}: at most {shown} ({short(top['model'])})")
    cells = [
        f"{short(row['model'])} {number(row, 'pl_flops_ratio'):.3f} / {number(row, 'pl_total_s'):.0f} s / "
        f"{number(row, 'pl_peak_gb'):.2f} GB"
        if row in ok
        else f"{short(row['model'])}: {one_line(str(row.get('pl_status')), 60)}"
        for row in rows
    ]
    if cells:
        lines += ["", "|" + " |" * per_line, "|" + "---|" * per_line]
        for start in range(0, len(cells), per_line):
            chunk = [cell("", c) for c in cells[start : start + per_line]]
            lines.append("| " + " | ".join(chunk + [""] * (per_line - len(chunk))) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names with a torchvision: or timm: prefix (default: the zoo)")
    parser.add_argument("--only", choices=["torchvision", "timm"])
    parser.add_argument("--skip-tp", action="store_true", help="run the prunelab path only")
    parser.add_argument("--limit", type=int, help="the first N models only")
    parser.add_argument("--size", type=int, help="square input size (default: the model's own, else 224)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model and path")
    parser.add_argument("--out", type=Path, default=Path("zoo.md"), help="Markdown table; the CSV goes next to it")
    parser.add_argument(
        "--summary", type=Path, metavar="CSV", help="print the summary and grid of a run's CSV; run nothing"
    )
    parser.add_argument("--worker", choices=["prunelab", "tp"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.summary:
        with args.summary.open(newline="") as f:
            print("\n".join(summary(list(csv.DictReader(f)))))
        return

    if args.worker:
        worker(args.worker, args.models, args.size)
        return

    notes = []
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        bad = [n for n in names if not n.startswith(("torchvision:", "timm:"))]
        if bad:
            parser.error(f"model names need a torchvision: or timm: prefix: {', '.join(bad)}")
    else:
        names, unknown = default_models(args.only)
        if unknown:
            notes.append(f"skipped, unknown to the installed timm: {', '.join(unknown)}")
    if args.only:
        names = [n for n in names if n.startswith(args.only + ":")]
    names = names[: args.limit]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = args.out.open("w")
    csv_file = args.out.with_suffix(".csv").open("w", newline="")
    table = csv.DictWriter(csv_file, [key for key, _ in COLUMNS] + CSV_ONLY)
    table.writeheader()

    def emit(line: str) -> None:
        print(line, flush=True)
        md.write(line + "\n")
        md.flush()

    for note in notes:
        emit(note + "\n")
    emit("| " + " | ".join(title for _, title in COLUMNS) + " |")
    emit("|" + "---|" * len(COLUMNS))
    rows = []
    for name in names:
        row = {"model": name}
        paths = [("pl", "prunelab")] + ([] if args.skip_tp else [("tp", "tp")])
        for prefix, path in paths:
            result = run_worker(path, name, args.size, args.timeout)
            row["size"] = row.get("size") or result.get("size")
            for key, value in result.items():
                if key != "size":
                    row[f"{prefix}_{key}"] = value
        if args.skip_tp:
            row["tp_status"] = "skipped"
        emit("| " + " | ".join(cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
        table.writerow({k: row.get(k) for k in table.fieldnames})
        csv_file.flush()
        rows.append(row)
    emit("")
    for line in summary(rows):
        emit(line)
    md.close()
    csv_file.close()


if __name__ == "__main__":
    main()
