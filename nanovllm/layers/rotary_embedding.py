"""Rotary position embedding (RoFormer, Su et al. 2021, arXiv 2104.09864), the "rotate half" layout of Qwen/Llama."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position-dependent angles ``pos * base^(-2i/d)``.

    Args:
        head_dim: size of one head (the whole head is rotated).
        max_position: the largest position + 1 that will be asked for.
        base: rope_theta of the checkpoint.
    """

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        # float32 throughout, the same arithmetic as the Hugging Face reference, so fp32 outputs match it exactly.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq)  # [P, d/2]
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int ``[T]``; q ``[T, H, D]``, k ``[T, Hkv, D]``. Returns the rotated (q, k), same dtypes."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, -1)  # [T, 1, D/2] each
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
