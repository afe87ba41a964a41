"""What the callbacks read from, and write to, the LightningModule they run with.

:class:`~sdmoe_train.lightning.module.PretrainModule` provides :class:`MoETrainingModule`; every callback
reaches the module through :func:`training_module`, so a recipe that pairs a monitor with another module
fails once, at setup, naming what is missing, instead of deep inside a hook.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.transformer import MoEAux, Transformer
from sdmoe_train.parallel.groups import ExpertParallelGroups


@runtime_checkable
class MoETrainingModule(Protocol):
    """The module's side of the contract with its callbacks."""

    model: Transformer
    """The bare transformer; the monitors measure the routed expert banks and routers of its MoE layers."""
    expert_groups: ExpertParallelGroups | None
    """The expert-parallel layout once the model is sharded; None when every rank holds every expert."""
    last_routing: MoEAux | None
    """Routing record of the latest training micro-batch (None before the first one, or for a dense model)."""
    step_skipped: bool
    """Set by :class:`~sdmoe_train.lightning.callbacks.NonFiniteGuard` when it drops this step's gradients;
    the module then leaves out the work of a completed step (bias update, SD-MoE step end)."""
    tokens_seen: int
    """Training tokens of all ranks so far (restored on resume); the throughput monitor counts with it."""


_CONTRACT = ("model", "expert_groups", "last_routing", "step_skipped", "tokens_seen")


def training_module(pl_module: Any, callback: str) -> MoETrainingModule:
    """``pl_module`` as the contract's side, checked.

    Raises:
        ConfigError: naming the callback and what the module lacks.
    """
    if not isinstance(pl_module, MoETrainingModule):
        missing = [name for name in _CONTRACT if not hasattr(pl_module, name)]
        raise ConfigError(
            f"{callback} needs a LightningModule with {', '.join(missing)} "
            f"(sdmoe_train.lightning.module.PretrainModule has them), not {type(pl_module).__name__}"
        )
    return pl_module
