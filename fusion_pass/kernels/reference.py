"""PyTorch reference of (residual add +) RMSNorm -> linears, in the rounding chain of the eager model; the CPU path.

Math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; Llama/Qwen rounding chain):

    h    = x + residual                          (optional, rounded to the activation dtype)
    n    = h_f32 * rsqrt(mean(h_f32^2, -1) + eps)
    a    = n.to(dtype) * g                       (weight_in_fp32=False: Llama/Qwen form)
    a    = (n * g.float()).to(dtype)             (weight_in_fp32=True:  torch.nn.RMSNorm / F.rms_norm form)
    y_i  = a @ W_i^T + b_i                       (W_i: [N_i, K] row-major, like nn.Linear)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_rms_norm(h: Tensor, norm_weight: Tensor, eps: float, weight_in_fp32: bool = False) -> Tensor:
    """RMSNorm over the last dim with fp32 statistics, in the rounding chain of the eager model.

    Args:
        h: [..., K] activations (fp32/bf16/fp16).
        norm_weight: [K] gain.
        eps: added to mean(h^2) (in fp32).
        weight_in_fp32: False: cast the normalized value to h.dtype, then multiply by the weight (Llama/Qwen).
            True: multiply in fp32, then cast (torch.nn.RMSNorm / F.rms_norm decomposition).
    Returns:
        [..., K] tensor of h.dtype.
    """
    hf = h.float()
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:
        return (n * norm_weight).to(h.dtype)
    return n.to(h.dtype) * norm_weight


def reference_rms_norm_linear(
    x2d: Tensor,
    norm_weight: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    eps: float,
    residual2d: Optional[Tensor] = None,
    weight_in_fp32: bool = False,
) -> tuple[list[Tensor], Optional[Tensor]]:
    """Eager reference: returns ([y_i: [M, N_i]], h: [M, K] or None). Shapes/dtypes as `rms_norm_linear`."""
    h = x2d + residual2d if residual2d is not None else x2d
    a = reference_rms_norm(h, norm_weight, eps, weight_in_fp32)
    ys = [F.linear(a, w, b) for w, b in zip(weights, biases)]
    return ys, (h if residual2d is not None else None)
