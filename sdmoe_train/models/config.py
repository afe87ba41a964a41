"""Typed configuration of the decoder: attention and the transformer trunk (the MoE layers: ``moe.config``).

Every check lives in ``__post_init__`` so that a bad recipe fails while it is parsed, before any
weights are allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdmoe_train.config_checks import divisors, require_positive
from sdmoe_train.errors import ConfigError
from sdmoe_train.moe.config import MoEConfig

__all__ = ["AttentionConfig", "MLAConfig", "MoEConfig", "TransformerConfig"]


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
        require_positive(
            "attention.mla",
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )
        if self.q_lora_rank is not None:
            require_positive("attention.mla", q_lora_rank=self.q_lora_rank)
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
        require_positive("attention", num_heads=self.num_heads, rope_theta=self.rope_theta)
        if self.qk_norm and self.mla is not None:
            raise ConfigError(
                "attention.qk_norm=true is implemented for GQA only; set attention.mla: null or qk_norm: false"
            )
        if self.mla is None:
            require_positive("attention", num_kv_heads=self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"attention.num_kv_heads={self.num_kv_heads} must divide "
                    f"attention.num_heads={self.num_heads} (valid: {divisors(self.num_heads)})"
                )
        if self.head_dim is not None:
            require_positive("attention", head_dim=self.head_dim)
            if self.head_dim % 2:
                raise ConfigError(f"attention.head_dim={self.head_dim} must be even (RoPE rotates pairs)")


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
        require_positive(
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
