"""How a run logs: every line once, without Lightning's tips, known noise or other libraries' INFO lines, and
W&B offline when no API key is configured."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


class _DropTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


# Warnings of our dependencies that say nothing about the user's run.
_KNOWN_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


# Other libraries' loggers whose INFO lines say nothing about the run: Lightning's accelerator lines
# ("GPU available: False, used: False", "Loading `train_dataloader` to estimate ...") repeat for every
# stage, the ONNX exporter's passes ("Replaced initializer ...", "The value 'step' is not 1.") for every
# export; an ONNX run printed 99 of them in 132 lines. `verbose_libraries` or `hydra.verbose` shows them.
_LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "onnx", "onnxscript", "onnx_ir")


def quiet_logs(quiet: bool, libraries: bool = False, verbose: bool | tuple[str, ...] = ()) -> None:
    """Every log line once, without Lightning's tips, known deprecation noise or other libraries' INFO lines.

    `quiet` keeps warnings only, prunelab's included; `libraries` lets other libraries log what prunelab
    does (INFO unless `quiet`). A logger that Hydra's `hydra.verbose` names (`verbose`, True: all of them)
    keeps the level Hydra gave it, and so do the loggers under it.

    Lightning gives its "lightning" logger a console handler of its own and also passes records on to
    the root logger, which Hydra gives a console and a file handler: with both, every line shows twice.
    """
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]:
            lightning_logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for message in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    level = logging.WARNING if quiet else logging.INFO
    # Lightning sets INFO on its sub-packages' loggers itself, so each is set here.
    levels = {"prunelab": level, **dict.fromkeys(_LIBRARY_LOGGERS, level if libraries else logging.WARNING)}
    for name, value in levels.items():
        named = verbose is True or any(name == v or name.startswith(v + ".") for v in verbose or ())
        if not named:
            logging.getLogger(name).setLevel(value)


def hydra_verbose() -> bool | tuple[str, ...]:
    """The loggers `hydra.verbose` sets to DEBUG: True for all of them, else their names (none outside Hydra)."""
    if not HydraConfig.initialized():
        return ()
    verbose = HydraConfig.get().verbose
    if isinstance(verbose, bool):
        return verbose
    return (verbose,) if isinstance(verbose, str) else tuple(verbose)


def use_wandb_offline_without_key() -> None:
    """W&B logs offline when no API key is configured, instead of prompting or failing."""
    netrc = Path.home() / ".netrc"
    has_key = "WANDB_API_KEY" in os.environ or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
