"""Shared fixtures: fixed seeds, two CPU threads, tiny configs of both model families."""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(params=["tiny_qwen_moe", "tiny_deepseek_moe"])
def tiny_config(request: pytest.FixtureRequest) -> TransformerConfig:
    """A tiny preset of each model family, shrunk further so a forward pass takes milliseconds."""
    config = presets.PRESETS[request.param]()
    config.n_layers = 2
    config.vocab_size = 256
    config.max_seq_len = 64
    return config
