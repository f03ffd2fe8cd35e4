"""What a run shows on its dashboard (W&B) and, for everyone, as PNG files in its run directory.

- W&B runs are grouped by experiment preset (or by sweep directory under `-m`) and tagged with the
  dataset, backbone, method and budget; the config is logged flat (`method.gamma`, ...).
- At each prune: the kept channels per group (or the sparsity per layer) as a bar chart and a table,
  also written as `stages/<prune>/layers.png` and `layers.csv`.
- At the end: for iterative methods the per-round accuracy and sparsity (`rounds.png`); the final
  model (`model.pt`, `model.ts` or `model.onnx`) as a W&B artifact when `logger.log_model=true`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.io import atomic_write
from prunelab.report import _plot_rounds, round_rows


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def logger_options(cfg: DictConfig) -> dict[str, Any]:
    """Arguments added to the configured logger: W&B's group and tags, and no checkpoint uploads
    (`log_model` uploads the final model instead, see `finish`)."""
    target = str(cfg.logger.get("_target_", ""))
    if not target.endswith("WandbLogger"):
        return {}
    group, tags = cfg.logger.get("group"), list(cfg.logger.get("tags") or [])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        if group is None:
            group = (
                Path(hydra.sweep.dir).name
                if hydra.mode == RunMode.MULTIRUN
                else hydra.runtime.choices.get("experiment")
            )
    except ValueError:  # not launched by Hydra (tests, Python)
        pass
    budget = {k: v for k, v in cfg.budget.items() if k in ("flops", "params", "sparsity", "latency") and v is not None}
    tags += [
        f"dataset={_name(cfg.dataset)}",
        f"backbone={cfg.backbone.get('name', _name(cfg.backbone))}",
        f"method={_name(cfg.method)}",
        *(f"budget.{k}={v}" for k, v in budget.items()),
    ]
    name = cfg.logger.get("name") or Path(str(cfg.paths.output_dir)).name
    return {"name": name, "group": group, "tags": tags, "log_model": False}


def _name(node: Any) -> str:
    """A config group's class name (`CIFAR10DataModule`, `L1Filter`)."""
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with dotted keys (`method.gamma`), as dashboards filter and group by them."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def layer_rows(plan: Any) -> list[dict[str, Any]]:
    """One row per channel group (kept / size) or per masked layer (kept / total, sparsity)."""
    if hasattr(plan, "keep"):
        return [
            {
                "layer": name,
                "kept": len(plan.keep[name]),
                "total": int(size),
                "fraction_kept": len(plan.keep[name]) / size,
            }
            for name, size in plan.sizes.items()
        ]
    return [
        {"layer": name, "kept": kept, "total": total, "fraction_kept": kept / total if total else 1.0}
        for name, (kept, total) in plan.counts().items()
    ]


def plot_layers(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Bars of the fraction each layer keeps (PNG), and the rows as CSV beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(rows)), 3.6))
    ax.bar(range(len(rows)), [r["fraction_kept"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction kept")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["layer"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path.with_suffix(".csv"), lambda tmp: tmp.write_text(text.getvalue()))
    return path


def log_prune(logger: Any, tag: str, rows: list[dict[str, Any]], png: Path) -> None:
    """The prune's per-layer structure on W&B: a table, a bar chart and the PNG."""
    if not _is_wandb(logger) or not rows:
        return
    import wandb

    table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.experiment.log(
        {
            f"{tag}/layers": table,
            f"{tag}/layers_bar": wandb.plot.bar(
                table, "layer", "fraction_kept", title=f"{tag}: fraction kept per layer"
            ),
            f"{tag}/layers_png": wandb.Image(str(png)),
        }
    )


def finish(logger: Any, cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> None:
    """Per-round curves (PNG, and on W&B), the summary, and the final model as an artifact when asked."""
    rows = round_rows(summary)
    png = run_dir / "rounds.png"
    if rows:
        table = [
            {
                "round": r["round"],
                "sparsity mean": r["sparsity"],
                "test/acc mean": r["test/acc"] or float("nan"),
                "test/acc std": 0.0,
            }
            for r in rows
        ]
        _plot_rounds(table, [], png)
    if logger is None:
        return
    logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if _is_wandb(logger):
        import wandb

        run = logger.experiment
        if rows:
            round_table = wandb.Table(
                columns=["round", "sparsity", "flops_ratio", "test/acc"],
                data=[[r["round"], r["sparsity"], r["flops_ratio"], r["test/acc"]] for r in rows],
            )
            run.log(
                {
                    "rounds": round_table,
                    "rounds_curve": wandb.plot.line(
                        round_table, "sparsity", "test/acc", title="test accuracy per round"
                    ),
                    "rounds_png": wandb.Image(str(png)),
                }
            )
        if cfg.logger.get("log_model", False):
            artifact = wandb.Artifact(
                f"model-{run.id}",
                type="model",
                metadata={k: v for k, v in summary.items() if isinstance(v, (int, float))},
            )
            for name in ("model.pt", "model.ts", "model.onnx"):
                if (run_dir / name).exists():
                    artifact.add_file(str(run_dir / name))
            run.log_artifact(artifact)
    logger.finalize("success")
    if _is_wandb(logger):
        # The run is over: flush and close it (Lightning leaves it open for a next fit).
        logger.experiment.finish()
