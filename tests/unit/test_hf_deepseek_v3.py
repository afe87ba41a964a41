"""The DeepSeek-V3 adapter: rotary row layouts, correction bias, refusals."""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.interop.hf.families.deepseek_v3 import permute_rope_rows
from tests.unit.hf_helpers import planted_state, small, to_hf_state_dict


def test_mla_rope_rows_are_interleaved_for_hf_and_restored_on_import() -> None:
    weight = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(12, 3)  # 2 heads of 2 nope + 4 rope rows
    interleaved = permute_rope_rows(weight, heads=2, rope_dim=4, to_interleaved=True)
    # Per head: nope rows 0, 1 stay; our rope rows (2, 3 | 4, 5) become pairs (2, 4), (3, 5).
    assert interleaved[:, 0].tolist() == [0, 3, 6, 12, 9, 15, 18, 21, 24, 30, 27, 33]
    assert torch.equal(permute_rope_rows(interleaved, heads=2, rope_dim=4, to_interleaved=False), weight)


def test_deepseek_selection_bias_travels_as_correction_bias() -> None:
    config = small("tiny_deepseek_moe")
    state = planted_state(config)
    hf = to_hf_state_dict(state, config, "deepseek_v3")
    bias = hf["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, state["blocks.1.ffn.router.selection_bias"])


def test_deepseek_refusal_names_gate_width_and_norm_eps() -> None:
    config = small("tiny_deepseek_moe")
    config.norm_eps, config.moe.shared_expert_gate, config.moe.shared_expert_hidden_dim = 1e-5, True, 32
    config.moe.group_score_fn = "max"
    with pytest.raises(ConfigError) as error:
        adapter_for("deepseek_v3").check_exportable(config)
    settings = ("arch.norm_eps=1e-05", "shared_expert_gate=true", "shared_expert_hidden_dim=32", "group_score_fn=max")
    assert all(setting in str(error.value) for setting in settings)


@pytest.mark.parametrize("interleaved", [True, False])
def test_deepseek_rotary_rows_are_permuted_only_for_interleaved_checkpoints(interleaved: bool) -> None:
    config = small("tiny_deepseek_moe")
    pairs = {ours: fn for ours, _, fn in adapter_for("deepseek_v3").key_pairs(config, {"rope_interleave": interleaved})}
    weight = torch.randn(config.attention.num_heads * 48, 64)  # (qk_nope 32 + qk_rope 16) rows per head
    imported = pairs["blocks.0.attn.q_b_proj.weight"](weight, False)
    assert torch.equal(imported, weight) != interleaved
    assert torch.equal(pairs["blocks.0.attn.q_b_proj.weight"](imported, True), weight)
