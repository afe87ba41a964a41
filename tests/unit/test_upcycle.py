"""Sparse upcycling: identical experts from the dense MLP, fresh router, same function at initialisation."""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.upcycle import upcycle_dense_model
from sdmoe_train.models import presets
from sdmoe_train.models.config import AttentionConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer


def _dense() -> Transformer:
    config = TransformerConfig(
        vocab_size=64, hidden_dim=32, n_layers=2, dense_hidden_dim=48, attention=AttentionConfig(num_heads=4), moe=None
    )
    return Transformer(config).eval()


def test_upcycled_experts_copy_the_dense_mlp_and_keep_the_function() -> None:
    dense = _dense()
    moe = upcycle_dense_model(dense, num_experts=4, top_k=2).eval()
    assert moe.config.moe.num_experts == 4 and moe.config.moe.norm_topk_prob
    for (index, layer), block in zip(moe.moe_layers(), dense.blocks, strict=True):
        for bank in ("gate_proj", "up_proj", "down_proj"):
            expected = getattr(block.ffn, bank).weight
            assert all(torch.equal(expert, expected) for expert in getattr(layer.experts, bank)), (index, bank)
        assert layer.router.weight.std() > 0  # a fresh router breaks the symmetry between the copies
    assert torch.equal(moe.blocks[1].attn.q_proj.weight, dense.blocks[1].attn.q_proj.weight)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-6)


def test_upcycling_an_moe_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a dense checkpoint"):
        upcycle_dense_model(Transformer(presets.tiny_qwen_moe()), num_experts=4)
