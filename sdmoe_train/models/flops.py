"""Training FLOPs per token of an architecture, from its config (the numerator of MFU).

Counted, per token (a multiply-accumulate is 2 FLOPs; training = forward + backward = 3 × forward, since the
backward pass computes a gradient for each matmul input and one for its weight, each as costly as the
forward matmul):

- attention projections: GQA ``q, k, v, o``; MLA ``q`` (directly or through ``q_a``/``q_b`` of rank
  ``q_lora_rank``), ``kv_a`` (to the latent plus the shared rotary key), ``kv_b`` and ``o``;
- attention scores and values: ``QKᵀ`` and ``AV`` over the full sequence length S (the convention of PaLM's
  appendix B, torchtitan and Megatron; a causal kernel skips about half of this work);
- feed-forward: dense SwiGLU layers, and in MoE layers the router (all E experts), the ``top_k`` routed
  experts, the shared experts and the shared-expert gate;
- the output head (``lm_head``).

Not counted: the embedding lookup, norms, RoPE, softmax and SiLU, residual adds and biases, the loss, token
dispatch (sorting, gathers, scatter-adds), the recomputation of activation checkpointing (MFU counts the
model's FLOPs, not the hardware's) and SD-MoE's extras (building ``W_c + W_u`` proxies and splitting
gradients, per optimizer step and proportional to the parameters, not the tokens). Routed experts are
counted at exactly ``top_k`` per token, i.e. dropless routing; a capacity factor that drops tokens makes
the model do slightly less. The derivation and the check against ``torch.utils.flop_counter`` are in
docs/performance.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sdmoe_train.models.config import TransformerConfig

TRAINING_MULTIPLIER = 3
"""Forward + backward FLOPs over forward FLOPs."""


@dataclass(frozen=True)
class TrainingFlops:
    """Training FLOPs (forward + backward) per token, by part of the model."""

    attention_projections: int
    attention_scores: int
    """``QKᵀ`` and ``AV``; grows with the sequence length."""
    dense_ffn: int
    router: int
    """Router logits over all experts, plus the shared-expert gate."""
    routed_experts: int
    shared_experts: int
    lm_head: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def training_flops_per_token(config: TransformerConfig, seq_len: int) -> TrainingFlops:
    """FLOPs of one training step divided by the tokens it trains on, for sequences of ``seq_len`` tokens.

    Args:
        config: the architecture.
        seq_len: tokens per training sequence (the attention span of each token in this convention).

    Returns:
        The per-token FLOPs of each part; ``.total`` is the MFU numerator per token.
    """
    hidden, attention = config.hidden_dim, config.attention
    if attention.mla is None:
        q_width, kv_width = attention.num_heads * config.head_dim, attention.num_kv_heads * config.head_dim
        projections = hidden * (q_width + 2 * kv_width) + q_width * hidden
        score_width = value_width = q_width
    else:
        mla = attention.mla
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        q_width, value_width = attention.num_heads * qk_head_dim, attention.num_heads * mla.v_head_dim
        if mla.q_lora_rank is None:
            projections = hidden * q_width
        else:
            projections = hidden * mla.q_lora_rank + mla.q_lora_rank * q_width
        projections += hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim)
        projections += mla.kv_lora_rank * attention.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        projections += value_width * hidden
        score_width = q_width
    scores = seq_len * (score_width + value_width)

    moe = config.moe
    moe_layers = sum(config.is_moe_layer(index) for index in range(config.n_layers))
    dense_layers = config.n_layers - moe_layers
    router = routed = shared = 0
    if moe is not None:
        router = hidden * moe.num_experts + (hidden if moe.shared_expert_gate else 0)
        routed = moe.top_k * 3 * hidden * moe.expert_hidden_dim
        shared = 3 * hidden * moe.shared_hidden_dim

    per_token_macs = {
        "attention_projections": config.n_layers * projections,
        "attention_scores": config.n_layers * scores,
        "dense_ffn": dense_layers * 3 * hidden * config.dense_hidden_dim,
        "router": moe_layers * router,
        "routed_experts": moe_layers * routed,
        "shared_experts": moe_layers * shared,
        "lm_head": hidden * config.vocab_size,
    }
    return TrainingFlops(**{part: 2 * TRAINING_MULTIPLIER * macs for part, macs in per_token_macs.items()})
