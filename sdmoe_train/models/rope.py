"""Rotary position embedding (RoFormer, arXiv 2104.09864) in the rotate-half layout.

The cos/sin tables are computed per forward pass from positions rather than stored as buffers: that
costs O(S·d) and keeps the model constructible on the meta device without stale buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(
    seq_len: int, rotary_dim: int, theta: float, device: torch.device, positions_BS: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, fp32: (S, rotary_dim) for positions 0..S-1, or (B, 1, S, rotary_dim) for
    per-token ``positions_BS`` (positions restarting at each packed document), broadcasting over heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    if positions_BS is None:
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    else:
        angles = (positions_BS.to(torch.float32)[..., None] * inv_freq).unsqueeze(1)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2) of the last dimension of ``x`` (..., S, d) by position-dependent angles."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
