"""Named architectures. A new Qwen or DeepSeek variant is a new function here, not a new model file.

These functions are the one source of the presets: the recipe files ``recipes/models/<name>.yaml`` are
generated from them (``sdmoe-train presets --write recipes/models``).

Paper-scale presets follow SD-MoE (arXiv 2602.12556) §9 of ``docs/design/sdmoe.md``. Where the paper is
silent we decide, and say so: shared-expert width 2048 for both Qwen-style sizes, 12 query / 4 key-value
heads of width 128 for the 7B trunk, Qwen's 151 936-token vocabulary, and DeepSeek-style scoring
(sigmoid, aux-loss-free bias) for the DeepSeek trunk. ``count_parameters`` gives (non-embedding,
total / active): Qwen 2B-A0.8B 2.014B / 0.806B; Qwen 7B-A1.5B 6.671B / 1.386B (7.14B / 1.85B with
embeddings); DeepSeek 2B-A0.8B 1.917B / 0.709B (MLA is lighter than the GQA it replaces).
"""

from __future__ import annotations

from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig

QWEN_VOCAB_SIZE = 151_936


def tiny_qwen_moe() -> TransformerConfig:
    """CPU-sized Qwen-style MoE: softmax top-2 of 8 experts plus one sigmoid-gated shared expert."""
    return TransformerConfig(
        vocab_size=4096,
        hidden_dim=128,
        n_layers=4,
        dense_hidden_dim=512,
        max_seq_len=256,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True),
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_hidden_dim=256,
            num_shared_experts=1,
            shared_expert_gate=True,
            score_fn="softmax",
            aux_loss_coef=0.01,
            z_loss_coef=0.001,
        ),
    )


def tiny_deepseek_moe() -> TransformerConfig:
    """CPU-sized DeepSeek-style MoE: MLA, 16 fine-grained experts in 4 groups, sigmoid scores,
    aux-loss-free bias balancing plus a small sequence-level loss, 2 shared experts, first layer dense."""
    return TransformerConfig(
        vocab_size=4096,
        hidden_dim=128,
        n_layers=4,
        dense_hidden_dim=512,
        max_seq_len=256,
        attention=AttentionConfig(
            num_heads=4,
            mla=MLAConfig(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        ),
        moe=MoEConfig(
            num_experts=16,
            top_k=4,
            expert_hidden_dim=64,
            num_shared_experts=2,
            score_fn="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_group=4,
            topk_group=2,
            group_score_fn="top2_sum",
            first_k_dense=1,
            seq_aux_loss_coef=0.0001,
            bias_update_rate=0.001,
        ),
    )


def _qwen_style(
    *,
    hidden_dim: int,
    n_layers: int,
    dense_hidden_dim: int,
    num_heads: int,
    num_kv_heads: int,
    num_experts: int,
    top_k: int,
    expert_hidden_dim: int,
) -> TransformerConfig:
    """The paper's Qwen-style trunk: Qwen vocabulary, 4096 tokens, 128-wide heads with q/k/v bias, RoPE base
    1e6, one sigmoid-gated shared expert of width 2048, softmax top-k with a 0.001 balance loss."""
    return TransformerConfig(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        dense_hidden_dim=dense_hidden_dim,
        max_seq_len=4096,
        attention=AttentionConfig(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=128, qkv_bias=True, rope_theta=1_000_000.0
        ),
        moe=MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            expert_hidden_dim=expert_hidden_dim,
            num_shared_experts=1,
            shared_expert_hidden_dim=2048,
            shared_expert_gate=True,
            score_fn="softmax",
            aux_loss_coef=0.001,
        ),
    )


def qwen_moe_2b_a0_8b() -> TransformerConfig:
    """Qwen-style 2B-A0.8B of the SD-MoE paper: 32 layers, hidden 1024, 8 routed + 1 shared, top-2."""
    return _qwen_style(
        hidden_dim=1024,
        n_layers=32,
        dense_hidden_dim=2048,
        num_heads=16,
        num_kv_heads=8,
        num_experts=8,
        top_k=2,
        expert_hidden_dim=2048,
    )


def qwen_moe_7b_a1_5b() -> TransformerConfig:
    """Qwen-style 7B-A1.5B of the SD-MoE paper: 40 layers, hidden 1536, 32 routed + 1 shared, top-4."""
    return _qwen_style(
        hidden_dim=1536,
        n_layers=40,
        dense_hidden_dim=4096,
        num_heads=12,
        num_kv_heads=4,
        num_experts=32,
        top_k=4,
        expert_hidden_dim=1024,
    )


def deepseek_moe_2b_a0_8b() -> TransformerConfig:
    """DeepSeek-style 2B-A0.8B of the SD-MoE paper: the Qwen 2B trunk with MLA and DeepSeek routing."""
    config = qwen_moe_2b_a0_8b()
    config.attention = AttentionConfig(
        num_heads=16,
        rope_theta=10_000.0,
        mla=MLAConfig(q_lora_rank=192, kv_lora_rank=64, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    )
    config.moe = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_hidden_dim=2048,
        num_shared_experts=1,
        shared_expert_hidden_dim=2048,
        score_fn="sigmoid",
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        seq_aux_loss_coef=0.0001,
        bias_update_rate=0.001,
    )
    return config


PRESETS = {
    fn.__name__: fn
    for fn in (tiny_qwen_moe, tiny_deepseek_moe, qwen_moe_2b_a0_8b, qwen_moe_7b_a1_5b, deepseek_moe_2b_a0_8b)
}
"""Every preset by name; ``recipes/models/<name>.yaml`` is generated from it (``sdmoe-train presets --write``)."""
