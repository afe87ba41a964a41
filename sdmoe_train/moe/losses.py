"""Router auxiliary losses: micro-batch and sequence-level load balancing, and the z-loss.

- Micro-batch balance loss (Switch Transformer, arXiv 2101.03961 eq. 4, generalised to top-k):
  ``E/(K·T) · Σ_e count_e · mean_t p_te``; equals 1 for perfectly uniform routing.
- Sequence-level balance loss (DeepSeek-V3, arXiv 2412.19437 eq. 17-20): the same quantity computed
  inside each sequence and averaged over sequences.
- Router z-loss (ST-MoE, arXiv 2202.08906 eq. 5): mean of ``logsumexp(logits)²``.
Counts carry no gradient; the probabilities do.
"""

# Shape key: B sequences, S tokens per sequence, T = B·S tokens, E experts, K experts per token.

from __future__ import annotations

import torch
from torch import Tensor

from sdmoe_train.moe.dispatch import bin_counts


def load_balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch-style balance loss over all tokens of the micro-batch.

    Args:
        probs_TE: router probabilities normalised over experts.
        expert_ids_TK: selected experts.

    Returns:
        Scalar fp32 loss (1.0 when routing is uniform).
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = expert_ids_TK.shape[-1]
    counts_E = bin_counts(expert_ids_TK, num_experts).to(probs_TE.dtype)
    return num_experts / (top_k * num_tokens) * torch.dot(counts_E, probs_TE.mean(dim=0))


def sequence_balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor, num_sequences: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over the micro-batch's sequences.

    Args:
        probs_TE: router probabilities normalised over experts, tokens ordered sequence by sequence.
        expert_ids_TK: selected experts.
        num_sequences: B; T must be a multiple of it.

    Returns:
        Scalar fp32 loss (1.0 when every sequence routes uniformly).
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = expert_ids_TK.shape[-1]
    seq_len = num_tokens // num_sequences
    seq_of_copy_TK = torch.arange(num_sequences, device=probs_TE.device).repeat_interleave(seq_len)
    flat_ids = (seq_of_copy_TK.unsqueeze(-1) * num_experts + expert_ids_TK).flatten()
    counts_BE = bin_counts(flat_ids, num_sequences * num_experts)
    counts_BE = counts_BE.view(num_sequences, num_experts).to(probs_TE.dtype)
    mean_probs_BE = probs_TE.view(num_sequences, seq_len, num_experts).mean(dim=1)
    per_sequence_B = (counts_BE * mean_probs_BE).sum(dim=-1) * num_experts / (top_k * seq_len)
    return per_sequence_B.mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: penalises large router logits, which destabilise the softmax in low precision."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
