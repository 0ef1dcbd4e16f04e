"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), optionally fused with the residual add before it."""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension; statistics in float32, the normalized
    value rounded to ``x.dtype`` before the weight multiply. x: ``[..., D]``, weight: ``[D]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, statistics in float32.

    Written in plain PyTorch on purpose: Inductor fuses it, and the ``coconut`` pass recognizes exactly this
    chain (upcast, pow, mean, add eps, rsqrt, mul, downcast, mul weight) in front of a linear.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: ``[..., hidden]``. Without ``residual`` returns the normalized x; with it, ``h = x + residual``
        is normalized and ``(norm(h), h)`` is returned (h is the next residual)."""
        if residual is None:
            return self._norm(x)
        h = x + residual
        return self._norm(h), h
