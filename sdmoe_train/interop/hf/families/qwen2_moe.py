"""Qwen2-MoE (``Qwen2MoeForCausalLM``): GQA with optional q/k/v bias, softmax top-k routing, one fused shared
expert scaled by ``sigmoid(shared_expert_gate(x))``; dense layers as ``mlp_only_layers``."""

from __future__ import annotations

from typing import Any

from sdmoe_train.interop.hf.adapter import KeyPair, shared_expert_pairs
from sdmoe_train.interop.hf.qwen import QwenAdapter
from sdmoe_train.models.config import TransformerConfig


class Qwen2MoeAdapter(QwenAdapter):
    model_type = "qwen2_moe"
    model_class = "Qwen2MoeForCausalLM"
    has_shared_expert = True

    def family_export_problems(self, config: TransformerConfig) -> list[str]:
        assert config.moe is not None
        if config.moe.num_shared_experts == 0:
            return ["moe.num_shared_experts=0: qwen2_moe always has a shared expert (use qwen3_moe)"]
        if not config.moe.shared_expert_gate:
            return ["moe.shared_expert_gate=false: qwen2_moe always gates the shared expert"]
        return []

    def hf_settings(self, config: TransformerConfig) -> dict[str, Any]:
        assert config.moe is not None
        return super().hf_settings(config) | {
            "qkv_bias": config.attention.qkv_bias,
            "shared_expert_intermediate_size": config.moe.shared_hidden_dim,
        }

    def qkv_bias(self, hf: dict[str, Any]) -> bool:
        return hf.get("qkv_bias", True)

    def moe_pairs(self, config: TransformerConfig, ours: str, theirs: str) -> list[KeyPair]:
        return [
            *super().moe_pairs(config, ours, theirs),
            *shared_expert_pairs(f"{ours}.shared_experts", f"{theirs}.shared_expert"),
            (f"{ours}.shared_expert_gate.weight", f"{theirs}.shared_expert_gate.weight", None),
        ]


ADAPTERS = (Qwen2MoeAdapter(),)
