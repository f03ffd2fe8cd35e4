"""Pruning methods: one file each, built from `conf/method/<name>.yaml`."""

from prunelab.methods.base import PruningMethod, Stage

__all__ = ["PruningMethod", "Stage"]
