"""Lightning callbacks a recipe names under ``trainer.callbacks`` (``sdmoe_train.lightning.callbacks.<Name>``).

The monitors and :class:`NonFiniteGuard` live here, one per file; :class:`PeriodicCheckpoint` and
:class:`PreemptionHandler` belong to :mod:`sdmoe_train.checkpointing` and are re-exported so that every
callback keeps one recipe class path.
"""

from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint
from sdmoe_train.checkpointing.preemption import PreemptionHandler
from sdmoe_train.lightning.callbacks.gate_alignment import GateAlignmentMonitor
from sdmoe_train.lightning.callbacks.gradient_alignment import GradientAlignmentMonitor
from sdmoe_train.lightning.callbacks.nonfinite import NonFiniteGuard
from sdmoe_train.lightning.callbacks.routing_health import RoutingHealthMonitor
from sdmoe_train.lightning.callbacks.spectral_overlap import SpectralOverlapMonitor
from sdmoe_train.lightning.callbacks.throughput import PerformanceMonitor

__all__ = [
    "GateAlignmentMonitor",
    "GradientAlignmentMonitor",
    "NonFiniteGuard",
    "PerformanceMonitor",
    "PeriodicCheckpoint",
    "PreemptionHandler",
    "RoutingHealthMonitor",
    "SpectralOverlapMonitor",
]
