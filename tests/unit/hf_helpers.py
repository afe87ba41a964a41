"""Shared by the Hugging Face mapping tests: small presets and state dicts in which every tensor is recognisable."""

from __future__ import annotations

import torch

from sdmoe_train.interop.hf.driver import from_hf_state_dict, hf_config
from sdmoe_train.interop.hf.driver import to_hf_state_dict as driver_to_hf_state_dict
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer

BANKS = ("gate_proj", "up_proj", "down_proj")


def to_hf_state_dict(state: dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> dict[str, torch.Tensor]:
    adapter = adapter_for(arch)
    return driver_to_hf_state_dict(state, config, adapter, hf_config(config, adapter))


def from_hf(tensors: dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> dict[str, torch.Tensor]:
    adapter = adapter_for(arch)
    return from_hf_state_dict(tensors, config, adapter, hf_config(config, adapter))


def small(name: str) -> TransformerConfig:
    config = presets.PRESETS[name]()
    config.n_layers, config.vocab_size, config.max_seq_len = 3, 64, 32
    return config


def planted_state(config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A state dict in which every tensor, and every expert of every bank, holds its own constant."""
    state = {key: value.clone() for key, value in Transformer(config).state_dict().items()}
    for code, key in enumerate(sorted(state)):
        state[key].fill_(float(code))
    for key in state:
        if ".experts." in key:
            layer, bank = int(key.split(".")[1]), BANKS.index(key.rsplit(".", 1)[1])
            for expert in range(state[key].shape[0]):
                state[key][expert] = 10_000 * layer + 1_000 * bank + expert
        if key.endswith("selection_bias") and config.moe.score_fn == "softmax":
            state[key].zero_()  # Qwen routers have no bias; a non-zero one is refused (tested below)
    return state
