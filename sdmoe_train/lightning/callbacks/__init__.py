"""Lightning callbacks, one per file."""

from sdmoe_train.lightning.callbacks.checkpoint import PeriodicCheckpoint
from sdmoe_train.lightning.callbacks.downstream_evaluation import DownstreamEvaluation
from sdmoe_train.lightning.callbacks.gate_alignment import GateAlignmentMonitor
from sdmoe_train.lightning.callbacks.gradient_alignment import GradientAlignmentMonitor
from sdmoe_train.lightning.callbacks.nonfinite import NonFiniteGuard
from sdmoe_train.lightning.callbacks.preemption import PreemptionHandler
from sdmoe_train.lightning.callbacks.routing_health import RoutingHealthMonitor
from sdmoe_train.lightning.callbacks.spectral_overlap import SpectralOverlapMonitor

__all__ = [
    "DownstreamEvaluation",
    "GateAlignmentMonitor",
    "GradientAlignmentMonitor",
    "NonFiniteGuard",
    "PeriodicCheckpoint",
    "PreemptionHandler",
    "RoutingHealthMonitor",
    "SpectralOverlapMonitor",
]
