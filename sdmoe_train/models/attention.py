"""Causal self-attention: grouped-query attention and DeepSeek Multi-head Latent Attention.

Both run through ``F.scaled_dot_product_attention`` so the best fused kernel for the device is used;
with a :class:`~sdmoe_train.models.document_attention.DocumentMask` (packed documents that must not
see each other) they attend only within each token's document instead.
MLA follows DeepSeek-V2 (arXiv 2405.04434 §2.1): queries optionally go through a low-rank bottleneck,
keys and values come from one compressed latent (kv_lora_rank) plus a single rotary key shared by all
heads. Inference may pass a :class:`~sdmoe_train.models.kv_cache.LayerKV`: the new positions' keys and values are
appended to it and the queries attend to every cached position (what MLA caches, and why: ``kv_cache``).
"""

# Shape key: B sequences, S tokens, D model width, H heads, G key/value heads, d per-head width, e value width,
# L cached + new positions.

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdmoe_train.models.config import MLAConfig, TransformerConfig
from sdmoe_train.models.document_attention import DocumentMask
from sdmoe_train.models.kv_cache import LayerKV
from sdmoe_train.models.rope import apply_rotary


class GroupedQueryAttention(nn.Module):
    """Multi-head attention whose G key/value heads are shared by groups of H/G query heads."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        attn = config.attention
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_dim, self.num_heads * self.head_dim, bias=attn.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_dim, self.num_kv_heads * self.head_dim, bias=attn.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_dim, self.num_kv_heads * self.head_dim, bias=attn.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_dim, bias=False)
        # Qwen3 (arXiv 2505.09388) normalises every query and key head before RoPE for training stability.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if attn.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if attn.qk_norm else None

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    def forward(
        self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: DocumentMask | None = None, cache: LayerKV | None = None
    ) -> Tensor:
        batch, seq_len, _ = x_BSD.shape
        q_BSHd = self.q_proj(x_BSD).view(batch, seq_len, self.num_heads, self.head_dim)
        k_BSGd = self.k_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHd, k_BSGd = self.q_norm(q_BSHd), self.k_norm(k_BSGd)
        q_BHSd, k_BGSd = q_BSHd.transpose(1, 2), k_BSGd.transpose(1, 2)
        v_BGSd = self.v_proj(x_BSD).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSd, k_BGSd = apply_rotary(q_BHSd, cos, sin), apply_rotary(k_BGSd, cos, sin)
        out_BHSd = _causal_attention(
            q_BHSd, k_BGSd, v_BGSd, mask, cache, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out_BHSd.transpose(1, 2).reshape(batch, seq_len, -1))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA with decoupled rotary keys."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        mla: MLAConfig = config.attention.mla
        self.mla = mla
        self.num_heads = config.attention.num_heads
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_dim, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_dim, mla.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(mla.q_lora_rank, eps=config.norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(config.hidden_dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_a_norm = nn.RMSNorm(mla.kv_lora_rank, eps=config.norm_eps)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * mla.v_head_dim, config.hidden_dim, bias=False)
        self.softmax_scale = 1.0 / math.sqrt(qk_head_dim)

    @property
    def rotary_dim(self) -> int:
        return self.mla.qk_rope_head_dim

    def forward(
        self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: DocumentMask | None = None, cache: LayerKV | None = None
    ) -> Tensor:
        mla, heads = self.mla, self.num_heads
        batch, seq_len, _ = x_BSD.shape
        if mla.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_BHSd = q.view(batch, seq_len, heads, -1).transpose(1, 2)
        q_nope, q_rope = q_BHSd.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.kv_a_proj(x_BSD).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv_BHSd = self.kv_b_proj(self.kv_a_norm(latent)).view(batch, seq_len, heads, -1).transpose(1, 2)
        k_nope, v_BHSd = kv_BHSd.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_rope_B1Sd = apply_rotary(k_rope.unsqueeze(1), cos, sin)

        q_BHSd = torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)
        k_BHSd = torch.cat((k_nope, k_rope_B1Sd.expand(-1, heads, -1, -1)), dim=-1)
        out_BHSd = _causal_attention(q_BHSd, k_BHSd, v_BHSd, mask, cache, scale=self.softmax_scale)
        return self.o_proj(out_BHSd.transpose(1, 2).reshape(batch, seq_len, -1))


def _causal_attention(
    q_BHSd: Tensor,
    k_BGSd: Tensor,
    v_BGSe: Tensor,
    mask: DocumentMask | None,
    cache: LayerKV | None,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """(B, H, S, e) causal attention over the sequence, within each document (``mask``), or to every cached
    position and the new ones (``cache``, which stores the new keys and values)."""
    if cache is not None:
        k_BGLd, v_BGLe = cache.append(k_BGSd, v_BGSe)
        return F.scaled_dot_product_attention(
            q_BHSd, k_BGLd, v_BGLe, attn_mask=cache.attention_mask, scale=scale, enable_gqa=enable_gqa
        )
    if mask is not None:
        return mask.attend(q_BHSd, k_BGSd, v_BGSe, scale=scale)
    return F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSe, is_causal=True, scale=scale, enable_gqa=enable_gqa)


def build_attention(config: TransformerConfig) -> GroupedQueryAttention | MultiHeadLatentAttention:
    """The attention module selected by ``config.attention``."""
    if config.attention.mla is None:
        return GroupedQueryAttention(config)
    return MultiHeadLatentAttention(config)
