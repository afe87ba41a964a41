"""Evaluating a model without changing the run around it: random states, train/eval mode, routing capacity.

lm-eval seeds Python's, NumPy's and torch's global generators (``simple_evaluate``), and building a model
draws initial weights from torch's. A training run that evaluates in between must continue exactly as if
it had not, or its losses (and its resume, which replays the saved generator states) would depend on the
evaluation schedule. :func:`preserved_rng_state` saves every global generator and puts it back.
:func:`evaluation_mode` runs the model as inference does: eval mode, no autograd graph, and MoE layers
without a capacity limit, so that no token is dropped and a token's score never depends on the other
sequences (or the padding) in its batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.moe.layer import MoELayer

_PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "64-true": None,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}
"""Lightning precision settings and the autocast dtype evaluation runs them with (None: parameters' dtype)."""


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restores Python's, NumPy's, torch's CPU and every CUDA device's generator state on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and dropless MoE routing inside; the previous mode and capacities after."""
    was_training = model.training
    dispatchers = [layer.dispatcher for layer in model.modules() if isinstance(layer, MoELayer)]
    capacities = [getattr(dispatcher, "capacity_factor", None) for dispatcher in dispatchers]
    model.eval()
    for dispatcher in dispatchers:
        if hasattr(dispatcher, "capacity_factor"):
            dispatcher.capacity_factor = None
    try:
        with torch.no_grad():
            yield
    finally:
        for dispatcher, capacity in zip(dispatchers, capacities, strict=True):
            if hasattr(dispatcher, "capacity_factor"):
                dispatcher.capacity_factor = capacity
        model.train(was_training)


def autocast_dtype(precision: str | int | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that reproduces a Lightning ``trainer.precision`` at evaluation time.

    Args:
        precision: the recipe's ``trainer.precision`` (``"bf16-mixed"``, ``"32-true"``, ...); None picks the
            training default of the device: bf16 autocast on a GPU, fp32 on a CPU.
        device: where the model runs.

    Returns:
        The dtype for ``torch.autocast``, or None for no autocast.

    Raises:
        ConfigError: for a precision Lightning does not define.
    """
    if precision is None:
        return torch.bfloat16 if device.type == "cuda" else None
    key = str(precision)
    if key not in _PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {sorted(_PRECISIONS)}")
    return _PRECISIONS[key]
