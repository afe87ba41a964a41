"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): MLA, sigmoid scores with ``e_score_correction_bias``, group-limited
top-k with top-2-sum group scores, ``routed_scaling_factor``, ``n_shared_experts`` shared experts and
``first_k_dense_replace`` dense layers.

RoPE layout: our attention rotates pairs (i, i + d/2) ("rotate half"). With ``rope_interleave: true`` (the
default, and what released DeepSeek weights need) transformers rotates pairs (2i, 2i+1) and emits them as
[evens, odds], so the rotary rows of the query and latent-key projections are permuted between the two
layouts; with ``rope_interleave: false`` it rotates halves like we do and the rows are copied as they are.
Export always writes ``rope_interleave: true`` with permuted rows, the layout of released checkpoints.
"""

# Shape key: H heads.

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdmoe_train.interop.hf.adapter import (
    HFAdapter,
    KeyPair,
    common_config_fields,
    moe_export_problems,
    refuse_import,
    routed_experts,
    shared_expert_pairs,
)
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig

LATENT_NORM_EPS = 1e-6
"""DeepseekV3Attention builds q_a_layernorm and kv_a_layernorm without passing rms_norm_eps, so they always
use the RMSNorm default; ours use arch.norm_eps."""


def rope_row_order(head_width: int, rope_dim: int, to_interleaved: bool) -> Tensor:
    """Row order of one head whose last ``rope_dim`` rows carry RoPE.

    HF's interleaved RoPE rotates pairs (2i, 2i+1) and emits them as [evens, odds]; our rotate-half rotates
    (i, i + d/2). So HF row 2i must hold our row i and HF row 2i+1 our row d/2 + i; the outputs then agree in
    layout and every q·k product is unchanged.
    """
    half = rope_dim // 2
    if to_interleaved:
        order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    else:
        order = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
    nope = head_width - rope_dim
    return torch.cat((torch.arange(nope), nope + order))


def permute_rope_rows(weight: Tensor, heads: int, rope_dim: int, to_interleaved: bool) -> Tensor:
    """``weight``'s rows, head by head, from our rotate-half layout to the interleaved one or back."""
    rows = weight.reshape(heads, -1, weight.shape[-1])
    return rows[:, rope_row_order(rows.shape[1], rope_dim, to_interleaved)].reshape(weight.shape)


class DeepseekV3Adapter(HFAdapter):
    model_type = "deepseek_v3"
    model_class = "DeepseekV3ForCausalLM"
    stores_selection_bias = True

    def export_problems(self, config: TransformerConfig) -> list[str]:
        problems = moe_export_problems(config, self.model_type)
        attn, moe = config.attention, config.moe
        if moe is None:
            return problems
        if attn.mla is None:
            problems.append("attention.mla=null: deepseek_v3 uses Multi-head Latent Attention")
        if moe.score_fn != "sigmoid":
            problems.append(f"moe.score_fn={moe.score_fn}: deepseek_v3 routes by sigmoid scores")
        if moe.n_group > 1 and moe.group_score_fn != "top2_sum":
            problems.append(f"moe.group_score_fn={moe.group_score_fn}: deepseek_v3 scores groups by top-2 sum")
        if moe.num_experts // moe.n_group < 2:
            problems.append(f"moe.num_experts={moe.num_experts}: deepseek_v3 needs >= 2 experts per group")
        if moe.num_shared_experts == 0:
            problems.append("moe.num_shared_experts=0: deepseek_v3 always has shared experts")
        if moe.shared_expert_hidden_dim not in (None, moe.expert_hidden_dim):
            problems.append(
                f"moe.shared_expert_hidden_dim={moe.shared_expert_hidden_dim}: deepseek_v3 shared experts have "
                f"the routed width moe.expert_hidden_dim={moe.expert_hidden_dim}"
            )
        if moe.shared_expert_gate:
            problems.append("moe.shared_expert_gate=true: deepseek_v3 does not gate its shared experts")
        if config.norm_eps != LATENT_NORM_EPS:
            problems.append(
                f"arch.norm_eps={config.norm_eps}: deepseek_v3 fixes the q/kv latent norms at eps {LATENT_NORM_EPS}"
            )
        return problems

    def hf_settings(self, config: TransformerConfig) -> dict[str, Any]:
        attn, moe = config.attention, config.moe
        assert moe is not None and attn.mla is not None
        mla = attn.mla
        return {
            "num_key_value_heads": attn.num_heads,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.num_shared_experts,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "first_k_dense_replace": moe.first_k_dense,
            "q_lora_rank": mla.q_lora_rank,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            "rope_interleave": True,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
        }

    def config_from_hf(self, hf: dict[str, Any]) -> TransformerConfig:
        problems: list[str] = []
        fields, theta = common_config_fields(hf, problems)
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", heads) != heads:
            problems.append(f"num_key_value_heads={hf['num_key_value_heads']}: MLA needs num_attention_heads={heads}")
        if hf.get("attention_bias", False):
            problems.append("attention_bias=true: our MLA projections have no bias")
        if fields["norm_eps"] != LATENT_NORM_EPS:
            problems.append(f"rms_norm_eps={fields['norm_eps']}: our MLA latent norms would use it, HF's use 1e-6")
        attention = AttentionConfig(
            num_heads=heads,
            num_kv_heads=heads,
            rope_theta=theta,
            mla=MLAConfig(
                q_lora_rank=hf.get("q_lora_rank"),
                kv_lora_rank=hf["kv_lora_rank"],
                qk_nope_head_dim=hf["qk_nope_head_dim"],
                qk_rope_head_dim=hf["qk_rope_head_dim"],
                v_head_dim=hf["v_head_dim"],
            ),
        )
        moe = MoEConfig(
            num_experts=routed_experts(hf),
            top_k=hf["num_experts_per_tok"],
            expert_hidden_dim=hf["moe_intermediate_size"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            score_fn="sigmoid",
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            group_score_fn="top2_sum",
            first_k_dense=hf.get("first_k_dense_replace") or 0,
        )
        refuse_import(self.model_type, problems)
        return TransformerConfig(**fields, attention=attention, moe=moe)

    def attention_pairs(self, config: TransformerConfig, hf: dict[str, Any], ours: str, theirs: str) -> list[KeyPair]:
        mla = config.attention.mla
        assert mla is not None
        heads, rope = config.attention.num_heads, mla.qk_rope_head_dim
        interleaved = hf.get("rope_interleave", True)

        def query_rows(weight: Tensor, to_hf: bool) -> Tensor:
            return permute_rope_rows(weight, heads, rope, to_interleaved=to_hf) if interleaved else weight

        def latent_rows(weight: Tensor, to_hf: bool) -> Tensor:
            return permute_rope_rows(weight, 1, rope, to_interleaved=to_hf) if interleaved else weight

        pairs: list[KeyPair] = [
            (f"{ours}.kv_a_proj.weight", f"{theirs}.kv_a_proj_with_mqa.weight", latent_rows),
            (f"{ours}.kv_a_norm.weight", f"{theirs}.kv_a_layernorm.weight", None),
            (f"{ours}.kv_b_proj.weight", f"{theirs}.kv_b_proj.weight", None),
            (f"{ours}.o_proj.weight", f"{theirs}.o_proj.weight", None),
        ]
        if mla.q_lora_rank is None:
            return [(f"{ours}.q_proj.weight", f"{theirs}.q_proj.weight", query_rows), *pairs]
        return [
            (f"{ours}.q_a_proj.weight", f"{theirs}.q_a_proj.weight", None),
            (f"{ours}.q_a_norm.weight", f"{theirs}.q_a_layernorm.weight", None),
            (f"{ours}.q_b_proj.weight", f"{theirs}.q_b_proj.weight", query_rows),
            *pairs,
        ]

    def moe_pairs(self, config: TransformerConfig, ours: str, theirs: str) -> list[KeyPair]:
        return [
            *super().moe_pairs(config, ours, theirs),
            (f"{ours}.router.selection_bias", f"{theirs}.gate.e_score_correction_bias", None),
            *shared_expert_pairs(f"{ours}.shared_experts", f"{theirs}.shared_experts"),
        ]


ADAPTERS = (DeepseekV3Adapter(),)
