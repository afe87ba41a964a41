"""The single decoder-only transformer behind every preset (Qwen-style and DeepSeek-style MoE, dense).

Pre-norm blocks: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` with RMSNorm, RoPE, GQA or MLA, and a
SwiGLU feed-forward that is dense for the first ``moe.first_k_dense`` blocks and MoE after.

Initialisation scheme (:meth:`Transformer.reset_parameters`):
- every weight matrix, embedding, router and expert bank: N(0, init_std²);
- residual-stream output projections (attention ``o_proj`` and every ``down_proj``, dense, shared and
  routed): N(0, (init_std / sqrt(2·n_layers))²), so the residual variance stays O(1) with depth
  (GPT-2, Radford et al. 2019);
- norm weights 1, biases 0, the routers' selection bias 0.
"""

# Shape key: B sequences, S tokens, D model width, V vocabulary, L MoE layers, E experts.

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdmoe_train.models.attention import build_attention
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.document_attention import DocumentKernel, DocumentMask
from sdmoe_train.models.rope import rotary_tables
from sdmoe_train.moe.layer import MoELayer, MoELayerStats
from sdmoe_train.moe.mlp import SwiGLU


@dataclass
class MoEAux:
    """Balancing losses and routing statistics of all MoE layers for one forward pass."""

    loss: Tensor
    """Sum of the coefficient-weighted balancing losses of all layers; add it to the LM loss."""
    layer_indices: tuple[int, ...]
    """Block index of each MoE layer, aligning the L axis of the tensors below."""
    load_balance_loss_L: Tensor
    """Micro-batch balance loss per layer (detached)."""
    sequence_balance_loss_L: Tensor
    """Sequence-level balance loss per layer (detached)."""
    z_loss_L: Tensor
    """Router z-loss per layer (detached)."""
    tokens_per_expert_LE: Tensor
    """Token copies selected for each expert (int64), the input of the bias update."""
    dropped_fraction_L: Tensor
    """Share of token copies dropped at capacity per layer."""

    @classmethod
    def from_layers(cls, layer_indices: list[int], stats: list[MoELayerStats]) -> MoEAux:
        return cls(
            loss=torch.stack([s.weighted_loss for s in stats]).sum(),
            layer_indices=tuple(layer_indices),
            load_balance_loss_L=torch.stack([s.load_balance_loss for s in stats]),
            sequence_balance_loss_L=torch.stack([s.sequence_balance_loss for s in stats]),
            z_loss_L=torch.stack([s.z_loss for s in stats]),
            tokens_per_expert_LE=torch.stack([s.tokens_per_expert_E for s in stats]),
            dropped_fraction_L=torch.stack([s.dropped_fraction for s in stats]),
        )


@dataclass
class TransformerOutput:
    logits: Tensor
    """(B, S, V) next-token logits."""
    moe: MoEAux | None
    """MoE losses and statistics; None for a dense model."""


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.ffn: MoELayer | SwiGLU
        if config.is_moe_layer(layer_index):
            self.ffn = MoELayer(config.hidden_dim, config.moe)
        else:
            self.ffn = SwiGLU(config.hidden_dim, config.dense_hidden_dim)

    def forward(
        self, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask: DocumentMask | None = None
    ) -> tuple[Tensor, MoELayerStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask)
        if isinstance(self.ffn, MoELayer):
            ffn_out, stats = self.ffn(self.ffn_norm(x_BSD))
            return x_BSD + ffn_out, stats
        return x_BSD + self.ffn(self.ffn_norm(x_BSD)), None


class Transformer(nn.Module):
    """Decoder-only language model configured entirely by a :class:`TransformerConfig`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        """Recompute each block in backward instead of storing its activations (set by the training setup)."""
        self.document_kernel: DocumentKernel = "auto"
        """Kernel of document-masked attention (see :mod:`sdmoe_train.models.document_attention`)."""
        self.reset_parameters()

    def forward(
        self, tokens_BS: Tensor, document_ids_BS: Tensor | None = None, positions_BS: Tensor | None = None
    ) -> TransformerOutput:
        """Next-token logits for a batch of token ids.

        Args:
            tokens_BS: int64 token ids, S <= config.max_seq_len.
            document_ids_BS: Document index of every token of packed sequences (see
                :func:`~sdmoe_train.models.document_attention.document_ids`); tokens then attend only
                within their document. None attends across the whole sequence.
            positions_BS: Rotary position of every token (e.g. restarting at each document); None
                numbers each sequence 0..S-1.

        Returns:
            Logits (B, S, V) and, for MoE models, the per-layer routing record.

        Raises:
            ValueError: If the sequences are longer than ``config.max_seq_len``.
        """
        seq_len = tokens_BS.shape[1]
        if seq_len > self.config.max_seq_len:
            # Not an assert: under `python -O` the model would silently train past its context length.
            raise ValueError(f"sequence of {seq_len} tokens > max_seq_len={self.config.max_seq_len}")
        cos, sin = rotary_tables(
            seq_len, self.blocks[0].attn.rotary_dim, self.config.attention.rope_theta, tokens_BS.device, positions_BS
        )
        mask = None if document_ids_BS is None else DocumentMask(document_ids_BS, self.document_kernel)
        x_BSD = self.embed(tokens_BS)
        moe_indices, moe_stats = [], []
        for index, block in enumerate(self.blocks):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x_BSD, stats = checkpoint(block, x_BSD, cos, sin, mask, use_reentrant=False)
            else:
                x_BSD, stats = block(x_BSD, cos, sin, mask)
            if stats is not None:
                moe_indices.append(index)
                moe_stats.append(stats)
        logits = self.lm_head(self.final_norm(x_BSD))
        return TransformerOutput(logits, MoEAux.from_layers(moe_indices, moe_stats) if moe_stats else None)

    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(block index, layer) for every MoE feed-forward, in depth order."""
        for index, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoELayer):
                yield index, block.ffn

    @torch.no_grad()
    def update_routing_biases(self, tokens_per_expert_LE: Tensor) -> None:
        """Apply one aux-loss-free balancing step to every MoE layer.

        Args:
            tokens_per_expert_LE: selected copies per expert since the last optimizer step, summed over
                micro-batches and data-parallel ranks (rows follow :meth:`moe_layers` order).
        """
        for (_, layer), counts_E in zip(self.moe_layers(), tokens_per_expert_LE, strict=True):
            layer.router.update_bias(counts_E)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter by the scheme in the module docstring."""
        for name, param in self.named_parameters():
            init_parameter_(param, name, self.config)
        for _, layer in self.moe_layers():
            layer.router.selection_bias.zero_()


@torch.no_grad()
def init_parameter_(
    param: Tensor, name: str, config: TransformerConfig, generator: torch.Generator | None = None
) -> None:
    """Fill ``param`` (named as in ``Transformer.named_parameters``) by the scheme in the module docstring.

    Biases and 1-D weights (norms) draw no random numbers; every other parameter draws one normal sample
    per element from ``generator`` (torch's global generator when None).
    """
    if name.endswith(".bias"):
        param.zero_()
    elif param.dim() == 1:
        param.fill_(1.0)
    elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
        param.normal_(0.0, config.init_std / math.sqrt(2 * config.n_layers), generator=generator)
    else:
        param.normal_(0.0, config.init_std, generator=generator)


def language_model_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean token cross-entropy of logits against their targets (the next tokens), in fp32 for stability
    under mixed precision."""
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
