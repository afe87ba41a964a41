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
from sdmoe_train.models.kv_cache import KVCache, LayerKV
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
        self,
        x_BSD: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: DocumentMask | None = None,
        cache: LayerKV | None = None,
        routing_stats: bool = True,
    ) -> tuple[Tensor, MoELayerStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask, cache)
        if isinstance(self.ffn, MoELayer):
            ffn_out, stats = self.ffn(self.ffn_norm(x_BSD), routing_stats)
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
        x_BSD, moe = self.hidden_states(tokens_BS, document_ids_BS, positions_BS)
        return TransformerOutput(self.lm_head(x_BSD), moe)

    def hidden_states(
        self,
        tokens_BS: Tensor,
        document_ids_BS: Tensor | None = None,
        positions_BS: Tensor | None = None,
        routing_stats: bool = True,
    ) -> tuple[Tensor, MoEAux | None]:
        """The normalised last hidden states (B, S, D) that ``lm_head`` maps to logits, and the routing record.

        For callers that need logits at a few positions only (scoring continuations, greedy decoding): they
        apply ``lm_head`` to those rows and skip most of the (B, S, V) projection. ``routing_stats=False``
        (inference) also skips the MoE layers' balancing losses and routing statistics, which only training,
        validation and monitors use: the hidden states are the same, the routing record is None. Other
        arguments and errors as in :meth:`forward`.
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
                x_BSD, stats = checkpoint(
                    block, x_BSD, cos, sin, mask, routing_stats=routing_stats, use_reentrant=False
                )
            else:
                x_BSD, stats = block(x_BSD, cos, sin, mask, routing_stats=routing_stats)
            if stats is not None:
                moe_indices.append(index)
                moe_stats.append(stats)
        return self.final_norm(x_BSD), MoEAux.from_layers(moe_indices, moe_stats) if moe_stats else None

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty key/value cache for :meth:`decode`.

        Args:
            batch_size: rows decoded together.
            capacity: positions per row, padding included; None means ``config.max_seq_len``, the most allowed.

        Raises:
            ValueError: if ``capacity`` exceeds ``config.max_seq_len``, or an MoE layer drops tokens at capacity
                (which token is dropped depends on the other tokens of the pass, so token-by-token decoding would
                not reproduce a full forward pass; evaluation routes dropless, see ``evaluation_mode``).
        """
        capacity = self.config.max_seq_len if capacity is None else capacity
        if capacity > self.config.max_seq_len:
            raise ValueError(f"cache capacity {capacity} > max_seq_len={self.config.max_seq_len}")
        dropping = [
            index
            for index, layer in self.moe_layers()
            if getattr(layer.dispatcher, "capacity_factor", None) is not None
        ]
        if dropping:
            raise ValueError(
                f"the MoE layers of blocks {dropping} drop tokens at capacity; decode with dropless routing "
                "(capacity_factor None, as evaluation_mode sets)"
            )
        return KVCache(len(self.blocks), batch_size, capacity, self.embed.weight.device)

    def decode(self, tokens_BS: Tensor, cache: KVCache, valid_BS: Tensor | None = None) -> Tensor:
        """Feed the next S tokens of every row after those in ``cache``, and append their keys and values to it.

        The first call feeds the prompts (left-padded to one length), each later one the tokens just chosen.
        Position for position, the result equals :meth:`hidden_states` of each row's whole sequence, to float
        rounding. Decoding is inference only: the MoE layers compute no balancing losses or routing statistics.

        Args:
            tokens_BS: int64 token ids.
            cache: from :meth:`new_cache`, holding the rows' earlier positions.
            valid_BS: False at left padding (before a row's first token); None means no padding.

        Returns:
            The normalised last hidden states (B, S, D), as :meth:`hidden_states` returns them.

        Raises:
            ValueError: if the positions exceed the cache's capacity.
        """
        valid_BS = torch.ones_like(tokens_BS, dtype=torch.bool) if valid_BS is None else valid_BS
        positions_BS = cache.start_step(valid_BS)
        cos, sin = rotary_tables(
            tokens_BS.shape[1],
            self.blocks[0].attn.rotary_dim,
            self.config.attention.rope_theta,
            tokens_BS.device,
            positions_BS,
        )
        x_BSD = self.embed(tokens_BS)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x_BSD, _ = block(x_BSD, cos, sin, cache=layer_cache, routing_stats=False)
        cache.finish_step()
        return self.final_norm(x_BSD)

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

        Raises:
            ValueError: ``tokens_per_expert_LE`` has a row count other than the MoE layers'; no bias changes.
        """
        layers = [layer for _, layer in self.moe_layers()]
        if tokens_per_expert_LE.shape[0] != len(layers):
            raise ValueError(
                f"update_routing_biases: {tokens_per_expert_LE.shape[0]} rows of expert counts for {len(layers)} "
                "MoE layers"
            )
        for layer, counts_E in zip(layers, tokens_per_expert_LE, strict=True):
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
