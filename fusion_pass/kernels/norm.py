"""The unfused path's one-pass Triton RMSNorm (+ residual add): one program per row, fp32 statistics."""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..launch import next_power_of_2
from .common import new_buffer


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, g_ptr, a_ptr, h_ptr, K, eps,
                     HAS_RES: tl.constexpr, WEIGHT_FP32: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: h = x (+ r); a = norm(h) * g. x, r, a, h: [M, K] contiguous; g: [K]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    dt = a_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * K + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(h_ptr + row * K + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)
    g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    n = hf * inv
    if WEIGHT_FP32:
        a = (n * g).to(dt)
    else:
        a = (n.to(dt).to(tl.float32) * g).to(dt)
    tl.store(a_ptr + row * K + cols, a, mask=mask)


def triton_rms_norm(x2d: Tensor, norm_weight: Tensor, eps: float, residual2d: Optional[Tensor] = None,
                    weight_in_fp32: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """One-pass Triton RMSNorm (+ residual add). x2d, residual2d: [M, K] contiguous; returns (a [M, K], h or None).

    K up to 65536 (one block per row).
    """
    M, K = x2d.shape
    a = new_buffer((M, K), x2d)
    h = new_buffer((M, K), x2d) if residual2d is not None else None
    if M == 0:
        return a, h
    block = next_power_of_2(K)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(M,)](x2d, residual2d if residual2d is not None else x2d, norm_weight, a,
                           h if h is not None else a, K, float(eps),
                           HAS_RES=residual2d is not None, WEIGHT_FP32=weight_in_fp32, BLOCK_K=block,
                           num_warps=warps)
    return a, h
