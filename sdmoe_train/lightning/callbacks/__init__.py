"""Lightning callbacks, one per file."""

from sdmoe_train.lightning.callbacks.checkpoint import PeriodicCheckpoint

__all__ = ["PeriodicCheckpoint"]
