"""The record of the settings that decide a run's result, kept in its run directory.

A command that finds another experiment's results in its run directory is refused; one that differs only
in settings that decide nothing (where things are, how they are shown, how fast they compute) resumes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.io import write_json
from prunelab.validate import ConfigError

# The settings that do not decide a run's result, left out of the record of what a run directory holds
# (`EXPERIMENT_FILE`): a key and everything under it. Changing one of them and running the same command
# again resumes the run; any other difference is refused. They only say where things are, how a run is
# shown or logged, or how fast and on what it computes:
NOT_DECIDING = (
    # What is printed and where metrics are logged.
    "quiet",
    "verbose_libraries",
    "logger",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    # Where the data, the outputs and the latency tables are (the run directory itself included): data
    # moved to a node's local disk is the same data.
    "paths",
    "dataset.root",
    "dataset.download",
    "budget.latency_cache",
    # Data-loader processes: each sample's order and augmentation are functions of the seed, the epoch
    # and the sample, not of the worker that loads it.
    "dataset.num_workers",
    # The devices one global batch (`dataset.batch_size`) is spread over, and how: a killed run may
    # resume on another number of GPUs or nodes.
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.sync_batchnorm",
    # Speed options that compute the same model up to rounding.
    "trainer.channels_last",
    "trainer.compile",
    # How often a fit stage saves a checkpoint: a resumed run ends as one that never stopped.
    "checkpoint_every_n_steps",
    # The export and the final latency timing are redone by every invocation from the final model;
    # no stage keeps anything of them.
    "export",
    "latency",
    # What Hydra's sweepers are given and the paper result the reports draw beside the runs.
    "objective",
    "paper",
    # Hydra's own settings (the job's config leaves them out; a caller's config may hold them).
    "hydra",
    # A method's copy of the run's own backbone and dataset (method=control compares them with its source's):
    # the sections themselves are recorded, but for the keys above (`dataset.root`, ...).
    "method.backbone",
    "method.dataset",
)


# The record of the deciding settings in the run directory, written by the command that starts the run.
EXPERIMENT_FILE = "experiment.json"


def experiment_record(cfg: DictConfig) -> dict[str, Any]:
    """The settings of `cfg` that decide a run's result, as flat `a.b.c` keys of JSON values.

    The settings of a latency budget (`budget.latency_*`) decide nothing while `budget.latency` is
    null; they default to the export format and the timing device, which do not decide either.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if any(prefix == key or prefix.startswith(key + ".") for key in NOT_DECIDING):
            return
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, float) and not math.isfinite(node):
            flat[prefix] = str(node)
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    if flat.get("budget.latency") is None:
        flat = {k: v for k, v in flat.items() if not k.startswith("budget.latency_")}
    # A JSON round trip gives the values the saved record reads back as (tuples as lists, paths as text).
    return json.loads(json.dumps(flat, default=str))


def _unset(value: Any) -> bool:
    """A value that means "off", which is what a setting added to prunelab defaults to (it changes nothing)."""
    return value is None or value is False or value == 0 or value in ("", [], {})


def experiment_differences(held: dict[str, Any], asked: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The deciding settings in which two records differ: (key, value held, value asked).

    A key that only one record has (a setting that a later version of prunelab added or removed, or
    another method's own) counts only when it is set there: a new setting at its "off" default changes
    nothing, so a run started before it existed still resumes.
    """
    missing = object()
    found = []
    for key in [*asked, *(k for k in held if k not in asked)]:
        here, wanted = held.get(key, missing), asked.get(key, missing)
        if (here is missing and _unset(wanted)) or (wanted is missing and _unset(here)):
            continue
        if here is missing or wanted is missing or here != wanted:
            found.append(
                (key, here if here is not missing else "absent", wanted if wanted is not missing else "absent")
            )
    return found


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse a run directory that holds another experiment's results; record this one's settings there.

    The record is written when the directory holds none (a new directory, one made before records
    existed, or one whose earlier command stopped before computing anything, e.g. at a setting refused
    after the record was written); then this command's settings replace it.
    """
    path = run_dir / EXPERIMENT_FILE
    asked = experiment_record(cfg)
    held = json.loads(path.read_text()) if path.exists() else None
    if held == asked:
        return
    if held is not None and _holds_results(run_dir):
        differences = experiment_differences(held, asked)
        if differences:
            shown = ", ".join(
                f"{key} ({_show(here)} here, {_show(wanted)} asked)" for key, here, wanted in differences[:8]
            )
            more = f", and {len(differences) - 8} more" if len(differences) > 8 else ""
            raise ConfigError(
                f"run directory {run_dir} holds another experiment: {shown}{more} (use another hydra.run.dir, "
                f"or delete {run_dir} to start over)"
            )
        # Only settings at their "off" value differ (a setting added since): the record takes them.
    write_json(path, asked)


def _holds_results(run_dir: Path) -> bool:
    """Whether a run directory holds anything computed: a stage's file, the rewind weights, the final model."""
    if any((run_dir / name).exists() for name in ("rewind.pt", "model.pt", "summary.json")):
        return True
    stages = run_dir / "stages"
    return stages.is_dir() and any(path.is_file() for path in stages.rglob("*"))


def _show(value: Any) -> str:
    """A setting's value as it is written on the command line, shortened past 60 characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
