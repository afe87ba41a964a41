"""SwiGLU feed-forward (Shazeer, arXiv 2002.05202): ``down(silu(gate(x)) * up(x))``.

The building block both packages share: ``models/`` uses :class:`SwiGLU` for dense layers, ``moe/`` for
the always-on shared experts and :func:`swiglu` inside the routed expert banks.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """The SwiGLU hidden activation ``silu(gate) * up`` of the two input projections."""
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP used by dense layers and by the always-on shared experts."""

    def __init__(self, hidden_dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_dim, intermediate_dim, bias=False)
        self.up_proj = nn.Linear(hidden_dim, intermediate_dim, bias=False)
        self.down_proj = nn.Linear(intermediate_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
