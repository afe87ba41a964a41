"""Document-aware causal attention for packed sequences (intra-document masking, as in Llama 3).

Training examples are packed from documents separated by the end-of-document token, so a sequence
may hold the end of one document and the start of the next. With masking, a token attends only to
earlier tokens of its own document: the attention mask is block-diagonal causal. The boundaries are
derived from the EOS positions of the packed tokens (:func:`document_ids`); the EOS ends its document.

Two kernels compute the same thing:

* ``"packed"`` (CPU and any device): every document becomes its own causal sequence. Documents are
  gathered into rows padded to a multiple of :data:`PACKED_LENGTH_GRANULE` tokens, rows of equal padded
  length share one ``scaled_dot_product_attention(is_causal=True)`` call, and the outputs are scattered
  back. Padding sits after every real token of its row, so the causal mask hides it from them, and the
  padded rows' own outputs are dropped: the result is exact. Its work is causal attention over each
  document (plus the padding), less than causal attention over the whole sequence; a batch without
  boundaries takes exactly that path. It reads the boundaries on the host, which is free on CPU but a
  synchronisation on GPUs.
* ``"flex"`` (CUDA): ``torch.nn.attention.flex_attention`` with a block mask built from the document
  ids, compiled. Blocks that no query may see are skipped. PyTorch 2.13 has no FlexAttention backward
  on CPU, which is why CPU training takes the packed path.

A plain boolean mask passed to ``scaled_dot_product_attention`` also works on every device, but the
CPU kernel then computes every block, twice the work of causal attention; see
``benchmarks/doc_attention.py`` for the measurements behind this choice.
"""

# Shape key: B sequences, S tokens, H query heads, G key/value heads, d query/key width, e value width,
# N documents (rows of the packed layout), P padded document length.

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DocumentKernel = Literal["auto", "packed", "flex"]
"""Kernel of document-masked attention; ``auto`` picks flex on CUDA and packed elsewhere."""

PACKED_LENGTH_GRANULE = 32
"""Documents are padded to a multiple of this many tokens, so that rows of equal length can share one
attention call: larger wastes work on padding, smaller makes more, smaller calls. CPU time of forward +
backward relative to causal attention at seq_len 1024 (documents of ~300 / ~900 tokens, GQA shapes of
the demo): 0.79 / 0.88 at 32, 0.90 / 0.93 at 64, 0.93 / 1.24 at 128, 1.10 / 1.23 at 256."""


def document_ids(tokens_BS: Tensor, eos_id: int) -> Tensor:
    """Index of the document each token belongs to, counted from the start of its sequence.

    Args:
        tokens_BS: Packed token ids; documents are separated by ``eos_id``, which ends its document.
        eos_id: The end-of-document token id.

    Returns:
        int32 (B, S): 0 for the tokens up to and including the first EOS, 1 after it, and so on.
    """
    is_eos_BS = (tokens_BS == eos_id).to(torch.int32)
    return (is_eos_BS.cumsum(dim=1, dtype=torch.int32) - is_eos_BS).contiguous()


def positions_in_documents(document_ids_BS: Tensor) -> Tensor:
    """Position of every token inside its document (restarting at 0 at each document start).

    A sequence that starts in the middle of a document numbers that document from 0 as well.

    Args:
        document_ids_BS: Output of :func:`document_ids`.

    Returns:
        int64 (B, S) positions.
    """
    batch, seq_len = document_ids_BS.shape
    index_S = torch.arange(seq_len, device=document_ids_BS.device)
    starts_BS = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    first_BS = torch.where(starts_BS, index_S, 0).cummax(dim=1).values
    return index_S - first_BS


@dataclass(frozen=True)
class _PackedLayout:
    """Where each document goes in the padded rows (computed once per forward, shared by all layers)."""

    gather_R: Tensor
    """For each row position of all padded rows (R in total), the flattened (B*S) token it reads."""
    rows: tuple[tuple[int, int], ...]
    """(N documents, padded length P) of each group of rows, in the order of ``gather_R``."""
    scatter_T: Tensor
    """For each flattened token, the row position that holds its output."""


class DocumentMask:
    """Block-diagonal causal attention for one batch of packed sequences, shared by all layers."""

    def __init__(self, document_ids_BS: Tensor, kernel: DocumentKernel = "auto") -> None:
        """Prepares the kernel's view of the document boundaries.

        Args:
            document_ids_BS: Output of :func:`document_ids` (any integer dtype).
            kernel: ``"packed"``, ``"flex"`` or ``"auto"`` (flex on CUDA, packed elsewhere).
        """
        self.document_ids_BS = document_ids_BS
        self.batch, self.seq_len = document_ids_BS.shape
        if kernel == "auto":
            kernel = "flex" if document_ids_BS.is_cuda else "packed"
        self.kernel: DocumentKernel = kernel
        self._packed = _packed_layout(document_ids_BS) if kernel == "packed" else None
        """None (packed kernel) when no sequence holds a document boundary."""
        self._block_mask = _block_mask(document_ids_BS) if kernel == "flex" else None

    def attend(self, q_BHSd: Tensor, k_BGSd: Tensor, v_BGSe: Tensor, scale: float | None = None) -> Tensor:
        """Causal attention restricted to each token's own document.

        Args:
            q_BHSd: Queries.
            k_BGSd: Keys; G must divide H (grouped-query attention).
            v_BGSe: Values.
            scale: Softmax scale; None means 1 / sqrt(d).

        Returns:
            (B, H, S, e) attention outputs.
        """
        enable_gqa = k_BGSd.shape[1] != q_BHSd.shape[1]
        if self._block_mask is not None:
            return _flex_attention(q_BHSd.is_cuda)(
                q_BHSd, k_BGSd, v_BGSe, block_mask=self._block_mask, scale=scale, enable_gqa=enable_gqa
            )
        if self._packed is None:
            # Every sequence is a single document: plain causal attention is exactly the masked one.
            return F.scaled_dot_product_attention(
                q_BHSd, k_BGSd, v_BGSe, is_causal=True, scale=scale, enable_gqa=enable_gqa
            )
        return _packed_attention(self._packed, q_BHSd, k_BGSd, v_BGSe, scale, enable_gqa)


def _packed_layout(document_ids_BS: Tensor) -> _PackedLayout | None:
    batch, seq_len = document_ids_BS.shape
    ids_BS = document_ids_BS.cpu()
    starts_BS = torch.ones(batch, seq_len, dtype=torch.bool)
    starts_BS[:, 1:] = ids_BS[:, 1:] != ids_BS[:, :-1]
    if int(starts_BS.sum()) == batch:
        return None
    # Flattened, every sequence start is a document start, so no document spans two sequences.
    starts_N = torch.nonzero(starts_BS.flatten()).flatten()
    lengths_N = torch.diff(starts_N, append=torch.tensor([batch * seq_len]))
    row_ends_N = (starts_N // seq_len + 1) * seq_len - 1
    granules_N = (lengths_N + PACKED_LENGTH_GRANULE - 1) // PACKED_LENGTH_GRANULE
    padded_N = torch.clamp(granules_N * PACKED_LENGTH_GRANULE, max=seq_len)
    gathers, reals, rows = [], [], []
    for padded in torch.unique(padded_N).tolist():
        members = torch.nonzero(padded_N == padded).flatten()
        offsets_P = torch.arange(padded)
        # Padding reads the row's last token: any real token works, since nothing real attends to it.
        gathers.append(torch.minimum(starts_N[members, None] + offsets_P, row_ends_N[members, None]).flatten())
        reals.append((offsets_P < lengths_N[members, None]).flatten())
        rows.append((len(members), padded))
    gather_R, real_R = torch.cat(gathers), torch.cat(reals)
    scatter_T = torch.empty(batch * seq_len, dtype=torch.long)
    scatter_T[gather_R[real_R]] = torch.nonzero(real_R).flatten()
    device = document_ids_BS.device
    return _PackedLayout(gather_R=gather_R.to(device), rows=tuple(rows), scatter_T=scatter_T.to(device))


def _packed_attention(
    layout: _PackedLayout, q_BHSd: Tensor, k_BGSd: Tensor, v_BGSe: Tensor, scale: float | None, enable_gqa: bool
) -> Tensor:
    batch, heads, seq_len, _ = q_BHSd.shape
    # One gather per input and one scatter of the output (each a single op in backward too); every
    # group of equally padded rows is a slice of the gathered rows.
    q_RHd, k_RGd, v_RGe = (
        t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], -1)[layout.gather_R] for t in (q_BHSd, k_BGSd, v_BGSe)
    )
    sizes = [count * padded for count, padded in layout.rows]
    outputs = []
    # split (not slicing) so that backward joins the group gradients with one cat instead of one
    # zero-filled full-size buffer per group.
    for (count, padded), q_Hd, k_Gd, v_Ge in zip(
        layout.rows, q_RHd.split(sizes), k_RGd.split(sizes), v_RGe.split(sizes), strict=True
    ):
        q_NHPd, k_NGPd, v_NGPe = (t.view(count, padded, *t.shape[1:]).transpose(1, 2) for t in (q_Hd, k_Gd, v_Ge))
        out_NHPe = F.scaled_dot_product_attention(
            q_NHPd, k_NGPd, v_NGPe, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        outputs.append(out_NHPe.transpose(1, 2).flatten(0, 1))
    out_TH = torch.cat(outputs)[layout.scatter_T]
    return out_TH.view(batch, seq_len, heads, -1).transpose(1, 2)


def _block_mask(document_ids_BS: Tensor):  # noqa: ANN202 (BlockMask is imported lazily)
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = document_ids_BS.shape

    def same_document_causal(b: Tensor, h: Tensor, q_index: Tensor, kv_index: Tensor) -> Tensor:
        return (document_ids_BS[b, q_index] == document_ids_BS[b, kv_index]) & (q_index >= kv_index)

    return create_block_mask(same_document_causal, batch, None, seq_len, seq_len, device=document_ids_BS.device)


@functools.cache
def _flex_attention(compiled: bool):  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises the full score matrix; compiled (on CUDA) it is one fused kernel.
    # Off CUDA it only runs forward (no CPU backward in PyTorch 2.13), which the tests use to check it.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
