"""prunelab: config-driven neural-network pruning experiments, and the same methods from Python."""

import importlib
from typing import Any

from prunelab.export import load_model, save_model

__all__ = [
    "PruneResult",
    "Pruner",
    "channel_groups",
    "count",
    "export_model",
    "latency",
    "load_model",
    "prune",
    "run",
    "save_model",
]
__version__ = "0.1.0"

# The Python API (`prunelab.prune`, `prunelab.Pruner`, the callback `prunelab.lightning.Pruning`, ...) is
# imported on first use: it loads Lightning and Hydra, which would make `import prunelab` take seconds
# longer for code that only loads or saves a model.
_API = dict.fromkeys(
    ("PruneResult", "channel_groups", "count", "export_model", "latency", "prune", "run"), "prunelab.api"
)
_API["Pruner"] = "prunelab.hooks"


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name == "lightning":
        return importlib.import_module("prunelab.lightning")
    raise AttributeError(f"module 'prunelab' has no attribute {name!r}")
