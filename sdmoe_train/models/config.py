"""Typed configuration of the decoder: attention, MoE feed-forward and the transformer trunk.

Every check lives in ``__post_init__`` so that a bad recipe fails while it is parsed, before any
weights are allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdmoe_train.errors import ConfigError


def _require_positive(owner: str, **values: float | int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{owner}.{name}={value} must be positive")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(kw_only=True)
class MLAConfig:
    """DeepSeek-V2 Multi-head Latent Attention (arXiv 2405.04434, §2.1)."""

    q_lora_rank: int | None = None
    """Rank of the query down-projection; None projects queries directly (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 512
    """Rank of the joint key/value latent that would be cached at inference."""
    qk_nope_head_dim: int = 128
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 64
    """Per-head query/key width carrying RoPE; the rotary key is shared by all heads."""
    v_head_dim: int = 128
    """Per-head value width."""

    def __post_init__(self) -> None:
        _require_positive(
            "attention.mla",
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        if self.q_lora_rank is not None:
            _require_positive("attention.mla", q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"attention.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)"
            )


@dataclass(kw_only=True)
class AttentionConfig:
    """Self-attention: grouped-query attention by default, MLA when ``mla`` is set."""

    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 4
    """Key/value heads for GQA; must divide num_heads (ignored by MLA)."""
    head_dim: int | None = None
    """Per-head width for GQA; None means hidden_dim // num_heads."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen uses it)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    qk_norm: bool = False
    """RMSNorm each query and key head (own weights per projection) before RoPE, as Qwen3; GQA only."""
    mla: MLAConfig | None = None
    """Multi-head Latent Attention settings; None selects GQA."""

    def __post_init__(self) -> None:
        _require_positive("attention", num_heads=self.num_heads, rope_theta=self.rope_theta)
        if self.qk_norm and self.mla is not None:
            raise ConfigError(
                "attention.qk_norm=true is implemented for GQA only; set attention.mla: null or qk_norm: false"
            )
        if self.mla is None:
            _require_positive("attention", num_kv_heads=self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"attention.num_kv_heads={self.num_kv_heads} must divide "
                    f"attention.num_heads={self.num_heads} (valid: {_divisors(self.num_heads)})"
                )
        if self.head_dim is not None:
            _require_positive("attention", head_dim=self.head_dim)
            if self.head_dim % 2:
                raise ConfigError(f"attention.head_dim={self.head_dim} must be even (RoPE rotates pairs)")


@dataclass(kw_only=True)
class MoEConfig:
    """Routed + shared experts of the MoE feed-forward layers and their load balancing."""

    num_experts: int = 8
    """Routed experts in each MoE layer."""
    top_k: int = 2
    """Routed experts chosen for each token."""
    expert_hidden_dim: int = 256
    """Intermediate width of one routed SwiGLU expert."""
    num_shared_experts: int = 0
    """Always-on shared experts, fused into one SwiGLU of width num_shared_experts * shared_expert_hidden_dim."""
    shared_expert_hidden_dim: int | None = None
    """Intermediate width of one shared expert; None means expert_hidden_dim."""
    shared_expert_gate: bool = False
    """Scale the shared-expert output by sigmoid(w·x) per token (Qwen-MoE)."""
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts (Qwen) or independent sigmoids (DeepSeek-V3)."""
    norm_topk_prob: bool = False
    """Renormalise the selected top-k scores to sum to one."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed output weights (DeepSeek)."""
    n_group: int = 1
    """Expert groups for group-limited routing; 1 disables it."""
    topk_group: int = 1
    """Groups a token may select experts from when n_group > 1."""
    group_score_fn: Literal["max", "top2_sum"] = "top2_sum"
    """How a group is scored for group-limited routing: best expert (DeepSeek-V2) or top-2 sum (V3)."""
    first_k_dense: int = 0
    """The first layers use a dense SwiGLU instead of MoE (DeepSeek's first_k_dense_replace)."""
    capacity_factor: float | None = None
    """None routes every token copy (dropless); otherwise each expert keeps at most
    ceil(capacity_factor * tokens * top_k / num_experts) copies and drops the rest."""
    aux_loss_coef: float = 0.0
    """Weight of the micro-batch (Switch-style) load-balancing loss."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the sequence-level balancing loss (DeepSeek-V3 eq. 17-20)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE): mean squared log-sum-exp of router logits."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: step size of the selection-bias update after each optimizer step; 0 disables."""

    def __post_init__(self) -> None:
        _require_positive("moe", num_experts=self.num_experts, expert_hidden_dim=self.expert_hidden_dim)
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} must lie in [1, moe.num_experts={self.num_experts}]")
        if self.num_shared_experts < 0:
            raise ConfigError(f"moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_expert_hidden_dim is not None:
            _require_positive("moe", shared_expert_hidden_dim=self.shared_expert_hidden_dim)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("moe.shared_expert_gate=true needs moe.num_shared_experts >= 1")
        _require_positive("moe", routed_scaling_factor=self.routed_scaling_factor, n_group=self.n_group)
        if self.num_experts % self.n_group:
            raise ConfigError(
                f"moe.n_group={self.n_group} must divide moe.num_experts={self.num_experts} "
                f"(valid: {_divisors(self.num_experts)})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"moe.topk_group={self.topk_group} must lie in [1, moe.n_group={self.n_group}]")
        experts_reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > experts_reachable:
            raise ConfigError(
                f"moe.top_k={self.top_k} exceeds the {experts_reachable} experts inside "
                f"moe.topk_group={self.topk_group} groups; raise topk_group or lower top_k"
            )
        if self.n_group > 1 and self.group_score_fn == "top2_sum" and self.num_experts // self.n_group < 2:
            raise ConfigError("moe.group_score_fn=top2_sum needs at least 2 experts per group; use group_score_fn=max")
        if self.first_k_dense < 0:
            raise ConfigError(f"moe.first_k_dense={self.first_k_dense} must be >= 0")
        if self.capacity_factor is not None:
            _require_positive("moe", capacity_factor=self.capacity_factor)
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}={getattr(self, name)} must be >= 0")

    @property
    def shared_hidden_dim(self) -> int:
        """Width of the fused shared-expert SwiGLU (0 when there is none)."""
        per_expert = self.shared_expert_hidden_dim or self.expert_hidden_dim
        return self.num_shared_experts * per_expert


@dataclass(kw_only=True)
class TransformerConfig:
    """The decoder trunk; ``moe=None`` gives a dense model."""

    vocab_size: int = 4096
    """Token vocabulary, including special tokens."""
    hidden_dim: int = 128
    """Model (residual stream) width."""
    n_layers: int = 2
    """Transformer blocks."""
    dense_hidden_dim: int = 512
    """Intermediate width of dense SwiGLU layers (all layers when moe is None, else the first_k_dense)."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on (sizes the RoPE table)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    init_std: float = 0.02
    """Std of the normal init of every weight; residual output projections use init_std / sqrt(2 * n_layers)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Self-attention settings."""
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    """MoE feed-forward settings; None makes every layer dense."""

    def __post_init__(self) -> None:
        _require_positive(
            "arch",
            vocab_size=self.vocab_size,
            hidden_dim=self.hidden_dim,
            n_layers=self.n_layers,
            dense_hidden_dim=self.dense_hidden_dim,
            max_seq_len=self.max_seq_len,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
        )
        attn = self.attention
        if attn.mla is None and attn.head_dim is None and self.hidden_dim % attn.num_heads:
            raise ConfigError(
                f"arch.hidden_dim={self.hidden_dim} must be divisible by attention.num_heads={attn.num_heads} "
                "unless attention.head_dim is set"
            )
        if attn.mla is None and self.head_dim % 2:
            raise ConfigError(f"attention head width {self.head_dim} (hidden_dim / num_heads) must be even for RoPE")
        if self.moe is not None and self.moe.first_k_dense > self.n_layers:
            raise ConfigError(f"moe.first_k_dense={self.moe.first_k_dense} exceeds arch.n_layers={self.n_layers}")

    @property
    def head_dim(self) -> int:
        """Per-head width used by GQA."""
        return self.attention.head_dim or self.hidden_dim // self.attention.num_heads

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether block ``layer_index`` (0-based) uses the MoE feed-forward."""
        return self.moe is not None and layer_index >= self.moe.first_k_dense
