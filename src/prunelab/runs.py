"""Run directories as analyses read them: a run's resolved config and summary, its stage folders, the metrics it
reached so far and the channel structure its plans kept."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prunelab.structure import ChannelPlan, MaskPlan


@dataclass
class Run:
    """One finished (or partly finished) run directory, with its resolved config and summary."""

    path: Path
    config: Any
    summary: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """A config group's chosen option (`method` -> `l1_filter`), a dotted config key (`seed`,
        `method.init_from`), or else a summary key."""
        choice = self.choices().get(key)
        if choice is not None:
            return choice
        value = OmegaConf.select(self.config, key, default=None) if self.config is not None else None
        if OmegaConf.is_dict(value) and "_target_" in value:
            # A group chosen without Hydra's record (e.g. a run started from Python): its class name.
            return str(value._target_).rsplit(".", 1)[-1]
        if value is None:
            value = self.summary.get(key, default)
        return value

    def choices(self) -> dict[str, str]:
        """The option chosen in each config group, from Hydra's record of the run (empty without one)."""
        record = self.path / ".hydra" / "hydra.yaml"
        if not record.exists():
            return {}
        choices = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.choices", default=None) or {}
        return {str(k): str(v) for k, v in choices.items() if not str(k).startswith("hydra/")}

    def label(self, keys: Sequence[str]) -> str:
        """A short name from config values, e.g. `method=PruningFromScratch seed=0 init_from=dense-e10`.

        Paths become their file name (a `model.pt` its run's folder name) and `_target_` values their
        class name, named after the node that holds them.
        """
        parts = []
        for key in keys:
            value, name = self.get(key), key.split(".")[-1]
            if name == "_target_" and "." in key:
                name = key.split(".")[-2]
                value = str(value).rsplit(".", 1)[-1]
            elif isinstance(value, str) and ("/" in value or os.sep in value):
                value = Path(value).parent.name if Path(value).name == "model.pt" else Path(value).name
            parts.append(f"{name}={value}")
        return " ".join(parts) or self.path.name


def mean_std(values: list[float]) -> str:
    """'mean +- sample std' of the values (two decimals), or the single value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run directory at or below the given paths (a folder with `config.yaml` and `stages/`), sorted."""
    found: set[Path] = set()
    for path in map(Path, paths):
        candidates = [path] if (path / "config.yaml").exists() else [p.parent for p in path.rglob("config.yaml")]
        found.update(c for c in candidates if (c / "stages").is_dir())
    runs = []
    for path in sorted(found):
        summary_file = path / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        runs.append(Run(path=path, config=OmegaConf.load(path / "config.yaml"), summary=summary))
    return runs


def _stage_dirs(run: Run, name: str | None = None) -> list[Path]:
    """The run's stage folders in run order (as `stages.json` lists them), optionally only those called `name`."""
    listing = run.path / "stages.json"
    if listing.exists():
        entries = json.loads(listing.read_text())
        stages = [(run.path / "stages" / e["dir"], e["name"]) for e in entries]
        return [path for path, stage in stages if path.is_dir() and (name is None or stage == name)]
    stages = [p for p in (run.path / "stages").iterdir() if p.is_dir() and p.name.split("-", 1)[0].isdigit()]
    stages.sort(key=lambda p: int(p.name.split("-", 1)[0]))
    return [p for p in stages if name is None or p.name.split("-", 1)[1] == name]


def metrics_so_far(run: Run) -> dict[str, Any]:
    """The run's summary, or for an unfinished run the metrics of the stages it completed."""
    if run.summary:
        return run.summary
    found: dict[str, Any] = {}
    for stage in _stage_dirs(run):
        if (stage / "done.json").exists():
            found.update(json.loads((stage / "done.json").read_text()))
    return found


def channel_structure(run: Run) -> tuple[list[str], list[int], list[int]]:
    """Group names, kept channels and channel counts before pruning, for every group of the run's plans.

    With several prune stages the counts before are those of the first plan and the kept channels
    those of the last one. Groups follow the first plan's order (the model's module order).
    """
    plans = [json.loads((p / "plan.json").read_text()) for p in _stage_dirs(run) if (p / "plan.json").exists()]
    plans = [p for p in plans if "keep" in p]
    if not plans:
        raise ValueError(f"{run.path} has no structured plan (stages/*/plan.json with channel keep lists)")
    names = list(plans[0]["sizes"])
    sizes = [int(plans[0]["sizes"][n]) for n in names]
    kept = [len(plans[-1]["keep"].get(n, range(plans[-1]["sizes"].get(n, 0)))) for n in names]
    return names, kept, sizes


def keep_ratios(run: Run) -> dict[str, float]:
    """The fraction of channels each group keeps: the structure's feature vector (Pruning from Scratch, Fig. 2)."""
    names, kept, sizes = channel_structure(run)
    return {n: k / s for n, k, s in zip(names, kept, sizes)}


def losses_before_pruning(run_dir: Path) -> list[float]:
    """The per-step training cross-entropies of every stage before the run's first prune (pretraining,
    searches), in the order the metrics logged them: what two runs of one configuration must share."""
    tags = []
    for stage in json.loads((run_dir / "stages.json").read_text()):
        if stage["kind"] == "prune":
            break
        tags.append(stage["name"] if stage["round"] is None else f"round{stage['round']}/{stage['name']}")
    found = sorted(run_dir.rglob("metrics.csv"))
    if not found:
        return []
    with found[0].open() as f:
        rows = list(csv.DictReader(f))
    return [float(row[f"{tag}/train/ce_step"]) for row in rows for tag in tags if row.get(f"{tag}/train/ce_step")]


def plan_difference(run_a: Path, run_b: Path) -> float:
    """The fraction of plan entries (kept channels, mask entries) on which two runs disagree, over every prune
    stage; 1.0 if they did not prune the same stages."""

    def plans(run_dir: Path) -> list[Path]:
        return sorted(p.relative_to(run_dir) for p in run_dir.glob("stages/*/plan.json"))

    if plans(run_a) != plans(run_b):
        return 1.0
    differ = total = 0
    for relative in plans(run_a):
        masks = (run_a / relative).with_name("masks.pt")
        if masks.exists():
            a, b = MaskPlan.load(masks), MaskPlan.load(run_b / relative.with_name("masks.pt"))
            differ += sum(int((a.masks[k] != b.masks[k]).sum()) for k in a.masks)
            total += sum(m.numel() for m in a.masks.values())
        else:
            a, b = ChannelPlan.load_json(run_a / relative), ChannelPlan.load_json(run_b / relative)
            for group, size in a.sizes.items():
                differ += len(set(a.keep[group]) ^ set(b.keep.get(group, [])))
                total += size
    return differ / total if total else 0.0
