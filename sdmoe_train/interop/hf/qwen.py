"""What the Qwen families share: grouped-query attention, softmax top-k routing, dense layers as a prefix.

:class:`QwenAdapter` is the common base of the Qwen2-MoE and Qwen3-MoE adapters and of their dense siblings
(Qwen2, Qwen3), which are imported for sparse upcycling and share their MoE sibling's tensor names.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sdmoe_train.interop.hf.adapter import (
    HFAdapter,
    common_config_fields,
    moe_export_problems,
    refuse_import,
    routed_experts,
)
from sdmoe_train.interop.hf.aux_loss import conversion_note, hf_router_aux_loss_coef, our_aux_loss_coef
from sdmoe_train.models.config import AttentionConfig, MoEConfig, TransformerConfig


class QwenAdapter(HFAdapter):
    """A Qwen family; subclasses say whether it has MoE layers, a gated shared expert and per-head q/k norms."""

    has_moe: ClassVar[bool] = True
    """False for the dense checkpoints (Qwen2, Qwen3): import only, every layer a dense SwiGLU."""
    has_qk_norm: ClassVar[bool] = False
    """Per-head RMSNorm of queries and keys before RoPE (Qwen3)."""
    has_shared_expert: ClassVar[bool] = False
    """One sigmoid-gated shared expert in every MoE layer (Qwen2-MoE)."""

    def export_problems(self, config: TransformerConfig) -> list[str]:
        problems = moe_export_problems(config, self.model_type, self.has_qk_norm)
        if config.moe is None:
            return problems
        attn, moe, arch = config.attention, config.moe, self.model_type
        if attn.mla is not None:
            problems.append(f"attention.mla is set: {arch} has grouped-query attention only")
        if moe.score_fn != "softmax":
            problems.append(f"moe.score_fn={moe.score_fn}: {arch} routes by softmax")
        if moe.n_group != 1:
            problems.append(f"moe.n_group={moe.n_group}: {arch} has no group-limited routing (needs 1)")
        if moe.routed_scaling_factor != 1.0:
            problems.append(f"moe.routed_scaling_factor={moe.routed_scaling_factor}: {arch} has none (needs 1.0)")
        return problems + self.family_export_problems(config)

    def family_export_problems(self, config: TransformerConfig) -> list[str]:
        """Refusals of one Qwen family beyond the shared ones."""
        return []

    def hf_settings(self, config: TransformerConfig) -> dict[str, Any]:
        assert config.moe is not None
        return {
            "num_key_value_heads": config.attention.num_kv_heads,
            "head_dim": config.head_dim,
            "num_experts": config.moe.num_experts,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(config.moe.first_k_dense)),
            "router_aux_loss_coef": hf_router_aux_loss_coef(config),
            "use_sliding_window": False,
        }

    def conversion_notes(self, config: TransformerConfig) -> list[str]:
        return [] if config.moe is None else [conversion_note(config)]

    def config_from_hf(self, hf: dict[str, Any]) -> TransformerConfig:
        """Our config; training-only settings the checkpoint lacks (z-loss, bias rate) keep our defaults, and
        ``router_aux_loss_coef`` becomes ``moe.aux_loss_coef`` by :mod:`~sdmoe_train.interop.hf.aux_loss`."""
        problems: list[str] = []
        fields, theta = common_config_fields(hf, problems)
        dense_layers = list(hf.get("mlp_only_layers") or [])
        if hf.get("decoder_sparse_step", 1) != 1 or dense_layers != list(range(len(dense_layers))):
            problems.append(
                f"decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, mlp_only_layers={dense_layers}: "
                "our dense layers must be the first k (moe.first_k_dense)"
            )
        if routed_experts(hf) < 1 and self.has_moe:
            problems.append(f"num_experts={routed_experts(hf)}: an MoE checkpoint without experts")
        problems += self.family_import_problems(hf)
        # Listed before MoEConfig validation can stop at the first of them.
        refuse_import(self.model_type, problems)
        attention = AttentionConfig(
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            qkv_bias=self.qkv_bias(hf),
            rope_theta=theta,
            qk_norm=self.has_qk_norm,
        )
        return TransformerConfig(**fields, attention=attention, moe=self._moe_config(hf, dense_layers))

    def _moe_config(self, hf: dict[str, Any], dense_layers: list[int]) -> MoEConfig | None:
        if not self.has_moe:
            return None
        shared = hf.get("shared_expert_intermediate_size", 0) if self.has_shared_expert else 0
        top_k = hf["num_experts_per_tok"]
        moe_layers = hf["num_hidden_layers"] - len(dense_layers)
        return MoEConfig(
            num_experts=max(routed_experts(hf), 1),
            top_k=top_k,
            expert_hidden_dim=hf["moe_intermediate_size"],
            num_shared_experts=1 if shared else 0,
            shared_expert_hidden_dim=shared or None,
            shared_expert_gate=bool(shared),
            score_fn="softmax",
            norm_topk_prob=hf.get("norm_topk_prob", False),
            first_k_dense=len(dense_layers),
            aux_loss_coef=our_aux_loss_coef(hf.get("router_aux_loss_coef", 0.0), top_k, moe_layers),
        )

    def family_import_problems(self, hf: dict[str, Any]) -> list[str]:
        """Settings of one Qwen family's ``config.json`` we cannot express, beyond the shared ones."""
        return []

    def qkv_bias(self, hf: dict[str, Any]) -> bool:
        """Whether the checkpoint's q/k/v projections carry biases."""
        return False
