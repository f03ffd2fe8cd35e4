"""prunelab: config-driven neural-network pruning experiments."""

from prunelab.export import load_model, save_model

__all__ = ["load_model", "save_model"]
__version__ = "0.1.0"
