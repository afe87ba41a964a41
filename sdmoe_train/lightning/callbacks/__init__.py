"""Lightning callbacks, one per file."""

from sdmoe_train.lightning.callbacks.checkpoint import PeriodicCheckpoint
from sdmoe_train.lightning.callbacks.nonfinite import NonFiniteGuard
from sdmoe_train.lightning.callbacks.preemption import PreemptionHandler

__all__ = ["NonFiniteGuard", "PeriodicCheckpoint", "PreemptionHandler"]
