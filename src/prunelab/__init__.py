"""prunelab: config-driven neural-network pruning experiments, and the same methods from Python."""

from prunelab.export import load_model, save_model

__all__ = ["PruneResult", "channel_groups", "count", "export_model", "latency", "load_model", "prune", "save_model"]
__version__ = "0.1.0"

# The Python API (`prunelab.prune`, ...) is imported on first use: it loads Lightning and Hydra, which
# would make `import prunelab` take seconds longer for code that only loads or saves a model.
_API = ("PruneResult", "channel_groups", "count", "export_model", "latency", "prune")


def __getattr__(name: str):
    if name in _API:
        from prunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'prunelab' has no attribute {name!r}")
