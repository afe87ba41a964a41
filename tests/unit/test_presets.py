"""Presets build, and their parameter counts match the paper's sizes and independent arithmetic."""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.parameters import count_parameters
from sdmoe_train.models.transformer import Transformer


def _gqa_moe_non_embedding_counts(config: TransformerConfig) -> tuple[int, int]:
    """(total, active) non-embedding parameters of a GQA MoE config, by hand from the config fields."""
    attn, moe, hidden = config.attention, config.moe, config.hidden_dim
    assert attn.mla is None and moe.first_k_dense == 0
    q_width, kv_width = attn.num_heads * config.head_dim, attn.num_kv_heads * config.head_dim
    attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
    if attn.qkv_bias:
        attention += q_width + 2 * kv_width
    routed = moe.num_experts * 3 * hidden * moe.expert_hidden_dim
    shared = 3 * hidden * moe.shared_hidden_dim + (hidden if moe.shared_expert_gate else 0)
    router = moe.num_experts * hidden
    norms = 2 * hidden
    per_layer = attention + routed + shared + router + norms
    active_per_layer = per_layer - routed + routed * moe.top_k // moe.num_experts
    final_norm = hidden
    return config.n_layers * per_layer + final_norm, config.n_layers * active_per_layer + final_norm


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_on_the_meta_device(name: str) -> None:
    config = presets.PRESETS[name]()
    with torch.device("meta"):
        model = Transformer(config)

    assert all(p.is_meta for p in model.parameters())
    assert len(model.blocks) == config.n_layers
    assert model.lm_head.weight.shape == (config.vocab_size, config.hidden_dim)


def test_qwen_2b_preset_has_2b_total_and_0_8b_active_non_embedding_parameters() -> None:
    counts = count_parameters(presets.qwen_moe_2b_a0_8b())

    assert counts.total_non_embedding == pytest.approx(2.0e9, rel=0.02)
    assert counts.active_non_embedding == pytest.approx(0.8e9, rel=0.02)


@pytest.mark.parametrize("name", ["qwen_moe_2b_a0_8b", "qwen_moe_7b_a1_5b"])
def test_qwen_preset_counts_equal_hand_computed_counts(name: str) -> None:
    config = presets.PRESETS[name]()
    counts = count_parameters(config)

    total, active = _gqa_moe_non_embedding_counts(config)
    assert counts.total_non_embedding == total
    assert counts.active_non_embedding == active
    assert counts.embedding == 2 * config.vocab_size * config.hidden_dim


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_moe_preset_has_fewer_active_than_total_parameters(name: str) -> None:
    config = presets.PRESETS[name]()
    counts = count_parameters(config)

    assert config.moe.top_k < config.moe.num_experts
    assert 0 < counts.active_non_embedding < counts.total_non_embedding
    assert counts.active < counts.total


@pytest.mark.parametrize("name", ["tiny_qwen_moe", "tiny_deepseek_moe"])
def test_tiny_preset_count_matches_the_materialised_model(name: str) -> None:
    config = presets.PRESETS[name]()
    model = Transformer(config)
    moe = config.moe
    counts = count_parameters(config)

    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.embedding == model.embed.weight.numel() + model.lm_head.weight.numel()

    num_moe_layers = config.n_layers - moe.first_k_dense
    routed = num_moe_layers * moe.num_experts * 3 * config.hidden_dim * moe.expert_hidden_dim
    banks = [p for n, p in model.named_parameters() if ".ffn.experts." in n]
    assert sum(p.numel() for p in banks) == routed
    inactive = routed * (moe.num_experts - moe.top_k)
    assert inactive % moe.num_experts == 0
    assert counts.active == counts.total - inactive // moe.num_experts


def test_tied_embeddings_are_counted_once() -> None:
    untied_config = presets.tiny_qwen_moe()
    tied_config = presets.tiny_qwen_moe()
    tied_config.tie_embeddings = True
    untied, tied = count_parameters(untied_config), count_parameters(tied_config)

    assert tied.embedding == tied_config.vocab_size * tied_config.hidden_dim
    assert tied.total == sum(p.numel() for p in Transformer(tied_config).parameters())
    assert tied.total_non_embedding == untied.total_non_embedding
    assert tied.active_non_embedding == untied.active_non_embedding


def test_dense_config_counts_every_parameter_as_active() -> None:
    config = presets.tiny_qwen_moe()
    config.moe = None
    counts = count_parameters(config)

    assert counts.active == counts.total == sum(p.numel() for p in Transformer(config).parameters())
