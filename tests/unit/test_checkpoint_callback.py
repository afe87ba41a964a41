"""PeriodicCheckpoint's own state: per-rank RNG states round-trip; bad settings are refused."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdmoe_train.checkpointing.periodic import RNG_STATES_KEY
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import PeriodicCheckpoint


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_states_saved_in_a_checkpoint_are_restored_before_the_first_resumed_step() -> None:
    callback = PeriodicCheckpoint(dirpath=None)
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint: dict = {}
    callback.on_save_checkpoint(trainer, None, checkpoint)
    expected = _draws()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    callback.on_load_checkpoint(trainer, None, checkpoint)
    callback.on_train_start(trainer, None)
    assert _draws() == expected
    # The state is written with weights-only-loadable types.
    assert isinstance(checkpoint[RNG_STATES_KEY][0]["numpy"][1], list)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"keep_last_k": 0}, "keep_last_k=0 must be >= 1"), ({"keep_last_k": 2, "monitor": "val/loss"}, "not both")],
)
def test_invalid_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PeriodicCheckpoint(**kwargs)
