"""Where a :class:`~sdmoe_train.lightning.module.PretrainModule` checkpoint keeps the transformer's weights."""

from __future__ import annotations

from typing import Any

from torch import Tensor

MODEL_PREFIX = "model."
"""Checkpoint ``state_dict`` keys of the transformer start with this (the module's ``model`` attribute)."""


def model_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The transformer's own ``state_dict`` inside a checkpoint (prefix removed)."""
    state = checkpoint.get("state_dict", {})
    return {key.removeprefix(MODEL_PREFIX): value for key, value in state.items() if key.startswith(MODEL_PREFIX)}
