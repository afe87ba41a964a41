"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k routing, no shared expert."""

from __future__ import annotations

from typing import Any

from sdmoe_train.interop.hf.qwen import QwenAdapter
from sdmoe_train.models.config import TransformerConfig


class Qwen3MoeAdapter(QwenAdapter):
    model_type = "qwen3_moe"
    model_class = "Qwen3MoeForCausalLM"
    has_qk_norm = True

    def family_export_problems(self, config: TransformerConfig) -> list[str]:
        attn, moe = config.attention, config.moe
        assert moe is not None
        problems = []
        if moe.num_shared_experts != 0:
            problems.append(f"moe.num_shared_experts={moe.num_shared_experts}: qwen3_moe has no shared expert")
        if attn.mla is None and not attn.qk_norm:
            problems.append("attention.qk_norm=false: qwen3_moe always normalises q and k per head")
        if attn.qkv_bias:
            problems.append("attention.qkv_bias=true: qwen3_moe's attention_bias would also bias o_proj")
        return problems

    def hf_settings(self, config: TransformerConfig) -> dict[str, Any]:
        return super().hf_settings(config) | {"attention_bias": False}

    def family_import_problems(self, hf: dict[str, Any]) -> list[str]:
        if hf.get("attention_bias", False):
            return ["attention_bias=true: qwen3_moe would bias o_proj too, which our attention lacks"]
        return []


ADAPTERS = (Qwen3MoeAdapter(),)
