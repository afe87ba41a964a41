"""The Qwen adapters (Qwen2-MoE, Qwen3-MoE, dense Qwen2/Qwen3): refusals, router bias, fused experts, aux loss."""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.driver import config_from_hf, hf_config
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.models.config import MLAConfig
from tests.unit.hf_helpers import from_hf, planted_state, small, to_hf_state_dict


def test_export_refusal_lists_every_differing_setting() -> None:
    config = small("tiny_qwen_moe")
    config.attention.mla = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    config.moe.score_fn, config.moe.capacity_factor, config.moe.routed_scaling_factor = "sigmoid", 1.25, 2.0
    with pytest.raises(ConfigError) as error:
        adapter_for("qwen2_moe").check_exportable(config)
    message = str(error.value)
    for setting in ("attention.mla", "moe.score_fn=sigmoid", "moe.capacity_factor=1.25", "routed_scaling_factor=2.0"):
        assert setting in message


def test_qwen_export_refuses_a_trained_selection_bias() -> None:
    config = small("tiny_qwen_moe")
    state = planted_state(config)
    state["blocks.2.ffn.router.selection_bias"] = torch.ones(config.moe.num_experts)
    with pytest.raises(ConfigError, match=r"selection_bias is non-zero in layers \[2\]"):
        to_hf_state_dict(state, config, "qwen2_moe")


def test_import_refusal_lists_every_unsupported_setting() -> None:
    settings = hf_config(small("tiny_qwen_moe"), adapter_for("qwen2_moe"))
    settings |= {
        "use_sliding_window": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
        "mlp_only_layers": [1],
        "hidden_act": "gelu",
    }
    with pytest.raises(ConfigError) as error:
        config_from_hf(settings)
    for setting in ("use_sliding_window", "rope_type='yarn'", "mlp_only_layers=[1]", "hidden_act='gelu'"):
        assert setting in str(error.value)


def test_fused_expert_layout_is_accepted_on_import() -> None:
    config = small("tiny_qwen_moe")
    state = planted_state(config)
    hf = to_hf_state_dict(state, config, "qwen2_moe")
    for layer in range(config.n_layers):
        prefix, experts = f"model.layers.{layer}.mlp.experts", range(config.moe.num_experts)
        gate = torch.stack([hf.pop(f"{prefix}.{e}.gate_proj.weight") for e in experts])
        up = torch.stack([hf.pop(f"{prefix}.{e}.up_proj.weight") for e in experts])
        hf[f"{prefix}.gate_up_proj"] = torch.cat((gate, up), dim=1)
        hf[f"{prefix}.down_proj"] = torch.stack([hf.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
    back = from_hf(hf, config, "qwen2_moe")
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_aux_loss_coefficient_is_converted_both_ways_and_explained() -> None:
    config = small("tiny_qwen_moe")  # 3 MoE layers, top-2
    config.moe.aux_loss_coef = 0.01
    adapter = adapter_for("qwen2_moe")
    settings = hf_config(config, adapter)
    assert settings["router_aux_loss_coef"] == 0.015  # x 3 MoE layers / top_k 2
    assert config_from_hf(settings).moe.aux_loss_coef == 0.01
    (note,) = adapter.conversion_notes(config)
    assert "moe.aux_loss_coef=0.01 <-> router_aux_loss_coef=0.015" in note and "3 MoE layers / top_k 2" in note
    assert adapter_for("deepseek_v3").conversion_notes(small("tiny_deepseek_moe")) == []
