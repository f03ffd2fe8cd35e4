"""Dense training and evaluation: the reference every pruning method is compared with."""

from prunelab.methods.base import PruningMethod


class Dense(PruningMethod):
    """Trains the backbone as it is (the base class's defaults)."""
