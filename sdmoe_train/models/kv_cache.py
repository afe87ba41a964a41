"""Key/value cache for incremental decoding: each new token attends to the stored keys and values of the tokens
before it instead of running the whole prefix through the model again.

Only inference uses it (:meth:`Transformer.decode <sdmoe_train.models.transformer.Transformer.decode>`); training
never builds one, so the training forward pass is the plain full-sequence one.

Every row of a batch occupies the same cache positions, so rows of different lengths are left-padded. A padding
position is never attended to by a real token and does not advance its row's rotary position: a row decodes as
it would alone, up to the float rounding of differently shaped kernels.

What is cached: grouped-query attention stores its G rotated key heads and G value heads. Multi-head Latent
Attention stores its expanded per-head keys (the no-RoPE part from ``kv_b_proj`` joined with the shared rotated
key) and values, as transformers' DeepSeek models do, not the compressed latent DeepSeek-V2 (arXiv 2405.04434,
§2.1.2) caches for serving. The latent is ``H·(d_nope + d_rope + d_v) / (kv_lora_rank + d_rope)`` times smaller,
but decoding from it either re-expands every cached latent through ``kv_b_proj`` at every step (more work per
step than the new token's whole forward pass at long prefixes) or folds ``kv_b_proj`` into the queries and the
output (the "absorbed" form), a second attention computation with its own rounding. Caching the expanded keys
and values reuses the training-time computation unchanged, so cached decoding reproduces a full forward pass to
fp32 rounding; evaluation batches (tens of rows, at most ``max_seq_len`` positions) fit easily.
"""

# Shape key: B sequences, S new tokens per row, C cache capacity, L filled + new positions, G key/value heads,
# d key width, e value width.

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """The keys and values of every attention layer for the positions decoded so far.

    Args:
        num_layers: attention layers of the model (one :class:`LayerKV` each, in depth order).
        batch_size: rows decoded together.
        capacity: positions per row (padding included); at most the model's ``max_seq_len``.
        device: where the bookkeeping lives (the model's device).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, device: torch.device) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"a cache needs capacity >= 1 and batch_size >= 1, not {capacity} and {batch_size}")
        self.capacity = capacity
        self.length = 0
        """Positions filled so far, the same for every row."""
        self.layers = [LayerKV(self) for _ in range(num_layers)]
        self._valid_BC = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self._next_position_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._step_end = 0
        self._step_mask_B1SL: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self._valid_BC.shape[0]

    def start_step(self, valid_BS: Tensor) -> Tensor:
        """Begin feeding S new positions of every row; the layers then :meth:`LayerKV.append` their keys and values.

        Args:
            valid_BS: False where a row's new position is left padding (only before the row's first real token).

        Returns:
            (B, S) rotary positions of the new tokens: each row counts only its real tokens.

        Raises:
            ValueError: if the new positions do not fit in the cache, or the batch size does not match.
        """
        batch_size, new = valid_BS.shape
        if batch_size != self.batch_size:
            raise ValueError(f"{batch_size} rows fed to a cache of {self.batch_size} rows")
        end = self.length + new
        if end > self.capacity:
            raise ValueError(f"{self.length} cached + {new} new positions exceed the cache capacity {self.capacity}")
        self._valid_BC[:, self.length : end] = valid_BS
        # Padding positions take the row's next position (clamped to 0 before its first token); never attended.
        positions_BS = (self._next_position_B[:, None] + valid_BS.cumsum(dim=1) - 1).clamp(min=0)
        self._next_position_B += valid_BS.sum(dim=1)
        query_S1 = torch.arange(self.length, end, device=valid_BS.device)[:, None]
        key_L = torch.arange(end, device=valid_BS.device)
        visible_BSL = (key_L <= query_S1) & self._valid_BC[:, None, :end]
        # A padding query sees no real key; seeing itself keeps its softmax finite (its output is never used).
        visible_BSL |= key_L == query_S1
        self._step_mask_B1SL = visible_BSL.unsqueeze(1)
        self._step_end = end
        return positions_BS

    def finish_step(self) -> None:
        """Mark the positions of the step as filled (every layer has appended them)."""
        self.length = self._step_end
        self._step_mask_B1SL = None

    @property
    def step_mask(self) -> Tensor:
        """(B, 1, S, L) boolean mask of the current step: which of the L positions each new position attends to."""
        assert self._step_mask_B1SL is not None, "start_step() must come before the layers attend"
        return self._step_mask_B1SL

    def keep_rows(self, rows: Tensor) -> None:
        """Drop every row not in ``rows`` (int64 indices, in the order the rows are kept), e.g. finished ones."""
        self._valid_BC = self._valid_BC.index_select(0, rows)
        self._next_position_B = self._next_position_B.index_select(0, rows)
        for layer in self.layers:
            layer.keep_rows(rows)


class LayerKV:
    """One attention layer's keys and values in a :class:`KVCache`; buffers are allocated on first use, in the
    dtype the layer produces (bf16 under bf16 autocast)."""

    def __init__(self, cache: KVCache) -> None:
        self._cache = cache
        self._keys_BGCd: Tensor | None = None
        self._values_BGCe: Tensor | None = None

    def append(self, keys_BGSd: Tensor, values_BGSe: Tensor) -> tuple[Tensor, Tensor]:
        """Store the keys and values of the step's new positions after the filled ones.

        Args:
            keys_BGSd: keys of the new positions (already rotated).
            values_BGSe: their values.

        Returns:
            The keys (B, G, L, d) and values (B, G, L, e) of every filled and new position.
        """
        cache = self._cache
        if self._keys_BGCd is None:
            batch, heads, _, key_width = keys_BGSd.shape
            self._keys_BGCd = keys_BGSd.new_empty(batch, heads, cache.capacity, key_width)
            self._values_BGCe = values_BGSe.new_empty(batch, heads, cache.capacity, values_BGSe.shape[-1])
        assert self._values_BGCe is not None
        start, end = cache.length, cache.length + keys_BGSd.shape[2]
        self._keys_BGCd[:, :, start:end] = keys_BGSd
        self._values_BGCe[:, :, start:end] = values_BGSe
        return self._keys_BGCd[:, :, :end], self._values_BGCe[:, :, :end]

    @property
    def attention_mask(self) -> Tensor:
        """The current step's (B, 1, S, L) mask (see :attr:`KVCache.step_mask`)."""
        return self._cache.step_mask

    def keep_rows(self, rows: Tensor) -> None:
        if self._keys_BGCd is not None and self._values_BGCe is not None:
            self._keys_BGCd = self._keys_BGCd.index_select(0, rows)
            self._values_BGCe = self._values_BGCe.index_select(0, rows)
