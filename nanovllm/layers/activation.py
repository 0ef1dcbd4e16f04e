"""SwiGLU activation (Shazeer 2020, arXiv 2002.05202)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x ``[..., 2 * d]`` laid out as gate | up -> ``silu(gate) * up`` ``[..., d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
