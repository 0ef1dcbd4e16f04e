"""Fused (residual add +) RMSNorm -> Linear Triton kernels, the unfused reference paths, and the dispatcher.

Math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; Llama/Qwen rounding chain):

    h    = x + residual                          (optional, rounded to the activation dtype)
    n    = h_f32 * rsqrt(mean(h_f32^2, -1) + eps)
    a    = n.to(dtype) * g                       (weight_in_fp32=False: Llama/Qwen form)
    a    = (n * g.float()).to(dtype)             (weight_in_fp32=True:  torch.nn.RMSNorm / F.rms_norm form)
    y_i  = a @ W_i^T + b_i                       (W_i: [N_i, K] row-major, like nn.Linear)

The fused kernels use the FlashNorm folding (Graef et al. 2024, arXiv 2407.09577): because 1/rms(h) is a per-row
scalar, y = ((h * g) @ W^T) * (1/rms(h)) + b, so the sum of squares is accumulated from the same h tiles that feed
the product and 1/rms is applied in the epilogue. The normalized activations never exist in memory.
(The rounding differs slightly from the eager chain: h*g is kept in fp32 in the GEMV path and rounded once to the
activation dtype in the tl.dot path; both are within bf16/fp16 tolerance of the eager result.)

Variants (all compute the same function):
  "torch"   : the PyTorch reference (fp32 statistics); the CPU path.
  "unfused" : a one-pass Triton RMSNorm kernel (writes a and h) + F.linear (cuBLAS on CUDA).
  "gemv"    : fused, decode-shaped: one program per (BN rows of W, BM rows of x); a [BM, BN, BK] broadcast-multiply
              and reduce over K (no tl.dot, no padding of M to 16), wide loads along K of W.
  "decode"  : fused, one program per BN columns and all M <= 16 rows; W tile streamed once (M <= 2), or tl.dot
              with M padded to 16.
  "multirow": fused, register-blocked GEMV for 3 <= M <= 16: one program per BN rows of W, the W tile loaded once
              and kept in registers while a static loop over the M rows computes each row's dot products.
  "stream"  : fused, for M = 1-2: each program owns BN whole rows of W (one [BN, next_pow2(K)] load) and loops over
              tiles with a persistent grid (c programs per SM), the next tile's W requested before the current one
              is reduced (register double buffering); measured on the H200 at M = 1 (benchmarks/
              sweep_decode_linear.py): qkv 4.5 us, gate_up 5.5 us, lm_head 75 us, against 5.4 / 7.0 / - for
              "decode" and 7.0 / 7.7 / 81 for the unfused path.
  "skinny"  : fused, for M = 2-32, on the tensor cores: split-K "swap-AB" (each program multiplies a [BN, KS] chunk of
              W, the MMA's wide side, by the chunk of a = h * g [KS, BM], M padded to BM >= 16) into fp32 partials
              and per-chunk sums of squares; a second kernel sums the chunks and applies 1/rms and the bias.
              Measured on the H200 (bf16, with the residual): qkv 5.8-6.7 us, gate_up 7.2-8.7 us at M = 2-32 against
              8.4-9.6 for Inductor norm + cuBLAS (results/fusion-skinny-h200.json).
  "gemm"    : fused, tiled tl.dot GEMM with grouped program order for L2 reuse; for large M.
The dispatcher ("auto") picks, per (M bucket, N, K, dtype), the fastest of the candidates BY MEASUREMENT on CUDA
(timed inside a CUDA graph, weights rotated beyond L2), caches the choice, never measures while the current stream
is capturing a CUDA graph (then it uses a pre-tuned choice, or "unfused"), and can be pre-tuned with `pretune`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is a hard dependency of the package, but keep the CPU reference importable without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

log = logging.getLogger("fusion_pass")

VARIANTS: tuple[str, ...] = ("torch", "unfused", "gemv", "decode", "multirow", "stream", "skinny", "gemm")

# Tests and benchmarks/check_fusion_gpu.py set this (or COCONUT_POISON=1) so that every output buffer the Triton
# paths allocate starts as NaN: an element a kernel forgets to write shows up as NaN instead of stale memory.
POISON_OUTPUTS: bool = os.environ.get("COCONUT_POISON", "0") == "1"


def _new_buffer(shape: tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Buffer of `shape` on like's device, of `dtype` (default like's); NaN-filled when POISON_OUTPUTS is set."""
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)
_FUSED = ("gemv", "decode", "multirow", "stream", "skinny", "gemm")

# --------------------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

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

    @triton.jit
    def _scaled_input_tile(x_ptr, r_ptr, g_ptr, h_ptr, rm64, rk, m_mask, k_mask, K, store_h, ss,
                           DT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_H: tl.constexpr):
        """K step of the gemv/gemm kernels: load the h = x (+ r) tile, add its sum of squares, scale by g.

        Rows rm64 [BM] (int64), columns rk [BK] of the [M, K] row-major x / r / h; m_mask, k_mask: their bounds.
        With HAS_RES, h = (x + r) rounded to DT, and with WRITE_H it is stored to h_ptr where store_h (a scalar
        bool: one program column writes it) is true. Returns (h_f32 * g_f32 [BM, BK] float32, ss + sum_k h_f32^2
        [BM] float32); masked elements count as 0.
        """
        xm = m_mask[:, None] & k_mask[None, :]
        x_off = rm64[:, None] * K + rk[None, :]
        h = tl.load(x_ptr + x_off, mask=xm, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + x_off, mask=xm, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(DT)
            if WRITE_H:
                if store_h:  # a scalar branch: Triton 3.9's interpreter rejects a scalar folded into the mask
                    tl.store(h_ptr + x_off, h, mask=xm)
        hf = h.to(tl.float32)
        ss += tl.sum(hf * hf, axis=1)
        g = tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
        return hf * g[None, :], ss

    @triton.jit
    def _fused_gemv_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, K, eps,
                           HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Decode-shaped fused kernel. Program (pid_n, pid_m) computes y[pid_m*BM:+BM, pid_n*BN:+BN].

        Per K step: loads h [BM, BK] (x + r), W [BN, BK] (contiguous along K: coalesced), accumulates
        sum_k h*g*W in fp32 via a [BM, BN, BK] broadcast product, and sum_k h^2 for 1/rms (FlashNorm epilogue).
        """
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_mask = rm < M
        n_mask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        dt = y_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        ss = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = rk < K
            a, ss = _scaled_input_tile(x_ptr, r_ptr, g_ptr, h_ptr, rm64, rk, m_mask, k_mask, K, pid_n == 0, ss,
                                       dt, HAS_RES, WRITE_H)
            w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
        inv = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * inv[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc.to(dt), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _fused_gemm_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, K, eps,
                           HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           IEEE: tl.constexpr):
        """Tiled fused GEMM: acc[BM, BN] += tl.dot((h*g).to(dtype), W^T); epilogue acc * 1/rms + b.

        Programs are ordered in groups of GROUP_M row-blocks so that consecutive programs share W tiles in L2.
        Programs with pid_n == 0 write h (residual form).
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        group_id = pid // width
        first_m = group_id * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % width) % gsz)
        pid_n = (pid % width) // gsz
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_mask = rm < M
        n_mask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        dt = y_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        ss = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = rk < K
            a, ss = _scaled_input_tile(x_ptr, r_ptr, g_ptr, h_ptr, rm64, rk, m_mask, k_mask, K, pid_n == 0, ss,
                                       dt, HAS_RES, WRITE_H)
            a = a.to(dt)
            # W^T tile [BK, BN] loaded directly (K is the fast axis of both the tile and the memory)
            wt = tl.load(w_ptr + rn64[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, wt, acc)
        inv = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * inv[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc.to(dt), mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def _fused_decode_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, K, eps,
                             HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                             IEEE: tl.constexpr):
        """Decode-shaped fused kernel, one program per BN output columns and ALL M (<= BM) rows.

        The hot loop streams W [BN, BK] tiles (the only bytes that matter at decode sizes); x (+ r) tiles are
        re-read by every program from L2 and give the sum of squares on the way; the residual output h is
        written by program 0 after the loop (no store in the hot loop), and 1/rms is applied in the epilogue
        (FlashNorm). USE_DOT pads
        M to BM >= 16 and multiplies with tl.dot (the tensor cores are idle otherwise, so padding is free);
        without it (M <= 2) a broadcast multiply-reduce over K is used.
        """
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        rm = tl.arange(0, BM)
        m_mask = rm < M
        n_mask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        dt = y_ptr.dtype.element_ty
        ss = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = rk < K
            # the W tile is requested first: it is the long-latency HBM read; x, r and g come from L2
            w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0, eviction_policy="evict_first")
            xm = m_mask[:, None] & k_mask[None, :]
            x_off = rm64[:, None] * K + rk[None, :]
            h = tl.load(x_ptr + x_off, mask=xm, other=0.0)
            if HAS_RES:
                h = (h.to(tl.float32) + tl.load(r_ptr + x_off, mask=xm, other=0.0).to(tl.float32)).to(dt)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
            g = tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
            a = hf * g[None, :]
            if USE_DOT:
                if IEEE:
                    acc = tl.dot(a.to(dt), tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a.to(dt), tl.trans(w), acc)
            else:
                acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if WRITE_H:
            if pid == 0:  # h = x + r, written once, outside the hot loop
                for k0 in range(0, K, BK):
                    rk = k0 + tl.arange(0, BK)
                    xm = m_mask[:, None] & (rk < K)[None, :]
                    x_off = rm64[:, None] * K + rk[None, :]
                    h = tl.load(x_ptr + x_off, mask=xm, other=0.0).to(tl.float32)
                    h += tl.load(r_ptr + x_off, mask=xm, other=0.0).to(tl.float32)
                    tl.store(h_ptr + x_off, h.to(dt), mask=xm)
        inv = 1.0 / tl.sqrt(ss / K + eps)
        acc = acc * inv[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * N + rn64[None, :], acc.to(dt), mask=m_mask[:, None] & n_mask[None, :])


    @triton.jit
    def _multirow_h(x, r, h_ptr, off, mask, store_h,
                    DT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_H: tl.constexpr):
        """One row slice of h = x (+ r) for the multirow kernel, returned as float32.

        x, r: [BK] tiles already loaded from the [M, K] row-major x / r (r unused without HAS_RES); off: their
        [BK] element offsets, mask: their bounds. With HAS_RES, h = (x + r) rounded to DT, and stored to h_ptr
        when WRITE_H and store_h (a scalar bool, true in one program only).
        """
        if HAS_RES:
            h = (x.to(tl.float32) + r.to(tl.float32)).to(DT)
            if WRITE_H:
                if store_h:  # a scalar branch, as in _scaled_input_tile
                    tl.store(h_ptr + off, h, mask=mask)
        else:
            h = x
        return h.to(tl.float32)

    @triton.jit
    def _fused_multirow_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, K, eps,
                               HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_TILE: tl.constexpr,
                               EVEN_K: tl.constexpr):
        """Register-blocked fused GEMV for a few rows (M <= BM <= 16): y[:, pid*BN:+BN] for ALL M rows.

        x, r, h: [M, K] row-major (fp16/bf16/fp32); g: [K]; W: [N, K] row-major; b: [N]; y: [M, N]; the
        accumulation is fp32. The program loads its W tile [BN, BK] (contiguous along K) once per K step, scales it
        by g once (W_nk * g_k, fp32) and keeps it in registers while a static loop over the BM rows streams them
        past it: per row it loads h = x (+ r) [BK] (tiny, L1/L2-resident), adds sum_k h^2 and computes the [BN]
        dot products sum_k h_k * (g_k W_nk) with tl.sum over K. No 3-D [BM, BN, BK] product (which spills at
        BM >= 4), no tl.dot, and W is read from HBM exactly once. 1/rms(h) is applied in the epilogue (FlashNorm).
        Rows M..BM-1 re-read row M - 1 (in bounds, so the row loads need no mask) and are not stored.
        ONE_TILE (BK >= K): no K loop; the next row's x (+ r) is requested before the current row's reductions
        (its latency overlaps them) and each row's result is finished and stored at once (no accumulator).
        EVEN_K (BK == K): the K mask is all-true at compile time. Otherwise (K > BK) the per-row partial sums
        live in acc [BM, BN] and ss [BM] across the K steps.
        h = x + r is written by program 0 only (pid == 0), once per element.
        """
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        n_mask = rn < N
        rn64 = rn.to(tl.int64)
        dt = y_ptr.dtype.element_ty
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros((BN,), dtype=tl.float32)
        if ONE_TILE:
            rk = tl.arange(0, BK)
            k_mask = rk < (BK if EVEN_K else K)  # all-true, known at compile time, when K == BK
            # the W tile is requested first: it is the long-latency HBM read; x, r and g come from L1/L2.
            # g is folded into it once (W_nk * g_k), so the rows need no scaling.
            w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0, eviction_policy="evict_first").to(tl.float32)
            w = w * tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            # rows >= M re-read row M - 1 (always in bounds, no row mask on the loads); their results are not stored
            x_next = tl.load(x_ptr + rk, mask=k_mask, other=0.0)  # row 0 (M >= 1)
            r_next = x_next
            if HAS_RES:
                r_next = tl.load(r_ptr + rk, mask=k_mask, other=0.0)
            for m in tl.static_range(BM):
                x_m = x_next
                r_m = r_next
                if m + 1 < BM:  # prefetch row m + 1: its latency overlaps this row's reductions
                    nxt = tl.minimum(M - 1, m + 1) * K + rk
                    x_next = tl.load(x_ptr + nxt, mask=k_mask, other=0.0)
                    if HAS_RES:
                        r_next = tl.load(r_ptr + nxt, mask=k_mask, other=0.0)
                hf = _multirow_h(x_m, r_m, h_ptr, m * K + rk, k_mask, (pid == 0) & (m < M), dt, HAS_RES, WRITE_H)
                inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)
                y = tl.sum(w * hf[None, :], axis=1) * inv + bias
                tl.store(y_ptr + m * N + rn64, y.to(dt), mask=n_mask & (m < M))
        else:
            rm = tl.arange(0, BM)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            ss = tl.zeros((BM,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                k_mask = rk < K
                w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0, eviction_policy="evict_first").to(tl.float32)
                w = w * tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
                for m in tl.static_range(BM):
                    off = tl.minimum(M - 1, m) * K + rk
                    x_m = tl.load(x_ptr + off, mask=k_mask, other=0.0)
                    r_m = x_m
                    if HAS_RES:
                        r_m = tl.load(r_ptr + off, mask=k_mask, other=0.0)
                    hf = _multirow_h(x_m, r_m, h_ptr, off, k_mask, (pid == 0) & (m < M), dt, HAS_RES, WRITE_H)
                    ss = tl.where(rm == m, ss + tl.sum(hf * hf, axis=0), ss)
                    acc = tl.where(rm[:, None] == m, acc + tl.sum(w * hf[None, :], axis=1)[None, :], acc)
            inv = 1.0 / tl.sqrt(ss / K + eps)
            y = acc * inv[:, None] + bias[None, :]
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn64[None, :], y.to(dt),
                     mask=(rm < M)[:, None] & n_mask[None, :])


    @triton.jit
    def _fused_stream_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, eps,
                             K: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr, USE_PDL: tl.constexpr = False):
        """Fused GEMV with whole-row W tiles and a persistent grid, for M <= BM (a few) rows.

        Program p handles the tiles t = p, p + P, p + 2P, ... (P programs; tile t = W rows [t*BN, t*BN + BN)). Each
        tile is ONE [BN, BKP] load of whole W rows (BKP = next_power_of_2(K), K a compile-time constant), issued for
        tile t + P before tile t is reduced (register double buffering; past the last tile the load is fully
        masked). Per row m: h = x (+ r) [BKP] (L1/L2-resident), sum of squares, y = sum_k W_nk (h_k g_k) * 1/rms(h)
        (FlashNorm epilogue) + b. Program 0 writes h = x + r on its first tile. x, r, h: [M, K] row-major; g: [K];
        W: [N, K] row-major; b: [N]; y: [M, N]. fp32 accumulation.
        USE_PDL (programmatic dependent launch, see `use_pdl`): the first W tile and g are loaded before
        waiting for the previous kernel in the stream; x, r, h and y are touched only after the wait.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        num_tiles = tl.cdiv(N, BN)
        rk = tl.arange(0, BKP)
        k_mask = rk < K
        rn0 = tl.arange(0, BN)
        dt = y_ptr.dtype.element_ty
        rn = pid * BN + rn0
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=(rn < N)[:, None] & k_mask[None, :],
                    other=0.0, eviction_policy="evict_first")
        g = tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for t in range(pid, num_tiles, nprog):
            rn = t * BN + rn0
            n_mask = rn < N
            rn_next = (t + nprog) * BN + rn0
            w_next = tl.load(w_ptr + rn_next.to(tl.int64)[:, None] * K + rk[None, :],
                             mask=(rn_next < N)[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            wf = w.to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            for m in tl.static_range(BM):
                if m < M:
                    h = tl.load(x_ptr + m * K + rk, mask=k_mask, other=0.0)
                    if HAS_RES:
                        h = (h.to(tl.float32) + tl.load(r_ptr + m * K + rk, mask=k_mask, other=0.0)
                             .to(tl.float32)).to(dt)
                        if WRITE_H:
                            if (t == pid) & (pid == 0):
                                tl.store(h_ptr + m * K + rk, h, mask=k_mask)
                    hf = h.to(tl.float32)
                    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)
                    y = tl.sum(wf * (hf * g)[None, :], axis=1) * inv
                    if HAS_BIAS:
                        y += bias
                    tl.store(y_ptr + m * N + rn, y.to(dt), mask=n_mask)
            w = w_next

    @triton.jit
    def _fused_skinny_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, p_ptr, q_ptr, c_ptr, M, N, eps,
                             K: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                             SPLIT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             KS: tl.constexpr, USE_PDL: tl.constexpr = False, FIXUP: tl.constexpr = False,
                             S: tl.constexpr = 1):
        """Fused split-K skinny GEMM on the tensor cores for a few rows (M <= BM, BM >= 16), swap-AB.

        Program (pid_n, s) takes the W chunk [BN, KS] (rows pid_n*BN.., columns s*KS..; ONE load, K a compile-time
        constant) as the MMA's left operand (its BN >= 16 rows fill the MMA's M side) and a = h * g [KS, BM] (h = x
        (+ r) for the same columns, rows >= M zero) as the right one: a small-M product computed as its transpose
        ("swap-AB"). a is rounded to the activation dtype before the MMA (IEEE: fp32 inputs multiplied in full fp32).
        SPLIT (K split into S = cdiv(K, KS) chunks): the fp32 partial product goes to p[s, m, n] ([S, M, N]) and the
        programs with pid_n == 0 write the chunk's sum of squares q[s, m] ([S, M]); ``_fused_splitk_epilogue_kernel``
        then sums both and applies 1/rms(h) (FlashNorm epilogue) and b. FIXUP (with SPLIT; S = cdiv(K, KS)): no
        second kernel; every program writes its chunk's sums of squares to q[pid_n, s, :] ([T, S, BM], T = n-tiles)
        and, after a CTA barrier, increments the tile's counter c[pid_n] (int32, zero before the launch) with one
        acq_rel atomic; the program that sees S - 1 arrived last, sums the S partials of its tile in a fixed order
        (deterministic), applies 1/rms and b, stores y and resets the counter to 0 (the "fixup" of Stream-K, Osama
        et al. 2023, arXiv 2301.03598, with a last-arrival counter instead of waiting). Without SPLIT (KS >= K) the
        program has the whole row and finishes y itself. Programs with pid_n == 0 write h = x + r (WRITE_H).
        x, r, h: [M, K] row-major; g: [K]; W: [N, K] row-major; b: [N]; y: [M, N]. USE_PDL: the W chunk and g are
        loaded before waiting for the previous kernel (see `use_pdl`). The engine's plain linears have a twin of this
        kernel (nanovllm.kernels.gemv._gemv_skinny_kernel, an activation instead of the norm); fusion_pass never
        imports nanovllm, so the chunk indexing below is written in both.
        """
        pid_n = tl.program_id(0)
        s = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        rn64 = rn.to(tl.int64)
        rk = s * KS + tl.arange(0, KS)
        k_mask = rk < K
        dt = y_ptr.dtype.element_ty
        w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        g = tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rm = tl.arange(0, BM)
        m_mask = rm < M
        xt_off = rm[None, :] * K + rk[:, None]  # [KS, BM]: the chunk of x^T, K along the rows
        xt_mask = k_mask[:, None] & m_mask[None, :]
        h = tl.load(x_ptr + xt_off, mask=xt_mask, other=0.0)
        if HAS_RES:
            h = (h.to(tl.float32) + tl.load(r_ptr + xt_off, mask=xt_mask, other=0.0).to(tl.float32)).to(dt)
            if WRITE_H:
                if pid_n == 0:
                    tl.store(h_ptr + xt_off, h, mask=xt_mask)
        hf = h.to(tl.float32)
        a = (hf * g[:, None]).to(dt)
        if IEEE:
            acc = tl.dot(w, a, input_precision="ieee")
        else:
            acc = tl.dot(w, a)
        if SPLIT:
            nm_mask = n_mask[:, None] & m_mask[None, :]
            p_off = rm[None, :].to(tl.int64) * N + rn64[:, None]  # [BN, BM] offsets in one [M, N] slice of p
            tl.store(p_ptr + (s * M).to(tl.int64) * N + p_off, acc, mask=nm_mask)
            if FIXUP:
                q_tile = q_ptr + (pid_n * S).to(tl.int64) * BM + rm  # this n-tile's [S, BM] sums of squares
                tl.store(q_tile + s * BM, tl.sum(hf * hf, axis=0))
                tl.debug_barrier()  # every thread's partial is written before the release below
                arrived = tl.atomic_add(c_ptr + pid_n, 1, sem="acq_rel")
                if arrived == S - 1:  # the last program of this n-tile: the fixup
                    ss = tl.zeros((BM,), dtype=tl.float32)
                    tot = tl.zeros((BN, BM), dtype=tl.float32)
                    for t in tl.static_range(S):  # fixed order: the same sums whatever the arrival order
                        tot += tl.load(p_ptr + (t * M).to(tl.int64) * N + p_off, mask=nm_mask, other=0.0,
                                       cache_modifier=".cg")
                        ss += tl.load(q_tile + t * BM, cache_modifier=".cg")
                    y = tot * (1.0 / tl.sqrt(ss / K + eps))[None, :]
                    if HAS_BIAS:
                        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                    tl.store(y_ptr + p_off, y.to(dt), mask=nm_mask)
                    tl.atomic_xchg(c_ptr + pid_n, 0)  # ready for the next launch
            elif pid_n == 0:
                tl.store(q_ptr + s * M + rm, tl.sum(hf * hf, axis=0), mask=m_mask)
        else:
            inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)  # [BM]; padded columns never stored
            y = acc * inv[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + rm.to(tl.int64)[None, :] * N + rn64[:, None], y.to(dt),
                     mask=n_mask[:, None] & m_mask[None, :])

    @triton.jit
    def _fused_splitk_epilogue_kernel(p_ptr, q_ptr, b_ptr, y_ptr, M, N, eps, K: tl.constexpr, S: tl.constexpr,
                                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        """The skinny variant's split-K epilogue: y[m, n] = (sum_s p[s, m, n]) * 1/rms(h_m) + b[n], with
        1/rms(h_m) = rsqrt(sum_s q[s, m] / K + eps). p: [S, M, N], q: [S, M] fp32; y: [M, N]; BLOCK consecutive
        (m, n) per program; one rounding to y's dtype. USE_PDL: b is loaded before waiting for the split kernel."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        n = offs % N
        m = offs // N
        bias = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        p = p_ptr + offs.to(tl.int64)  # advanced by one [M, N] slice per split (64-bit)
        q = q_ptr + m
        for s in tl.static_range(S):
            acc += tl.load(p, mask=mask, other=0.0)
            ss += tl.load(q, mask=mask, other=0.0)
            p += M * N
            q += M
        y = acc * (1.0 / tl.sqrt(ss / K + eps)) + bias
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------

# GEMV: (BN, BK, num_warps) per BM = bucket(M) (M <= 16). BM * BN * BK <= 16K fp32 products per K step.
GEMV_CONFIGS: dict[int, list[tuple[int, int, int]]] = {
    1: [(16, 512, 4), (32, 256, 4), (8, 1024, 4)],
    2: [(16, 256, 4), (8, 512, 4), (32, 128, 4)],
    4: [(16, 128, 4), (8, 256, 4)],
    8: [(8, 128, 4), (16, 64, 4)],
    16: [(8, 64, 4), (4, 128, 4)],
}
# GEMM: (BM, BN, BK, num_warps, num_stages) by M range.
GEMM_CONFIGS: list[tuple[int, list[tuple[int, int, int, int, int]]]] = [
    (16, [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 32, 256, 4, 3)]),
    (64, [(32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]),
    (256, [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 64, 128, 4, 4)]),
    (1 << 62, [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)]),
]
GEMV_MAX_M = 16
# DECODE: (BN, BK, num_warps, num_stages, use_dot) per M bucket (M <= 16); BM = 16 with tl.dot, else bucket(M).
DECODE_CONFIGS: dict[int, list[tuple[int, int, int, int, int]]] = {
    1: [(4, 1024, 4, 1, 0), (2, 1024, 2, 1, 0), (8, 512, 4, 2, 0), (16, 256, 4, 3, 1), (32, 256, 4, 3, 1)],
    2: [(4, 1024, 4, 1, 0), (8, 512, 4, 2, 0), (16, 256, 4, 3, 1), (32, 256, 4, 3, 1)],
    4: [(16, 256, 4, 3, 1), (32, 256, 4, 3, 1), (16, 512, 4, 2, 1)],
    8: [(16, 256, 4, 3, 1), (32, 256, 4, 3, 1), (16, 512, 4, 2, 1)],
    16: [(16, 256, 4, 3, 1), (32, 256, 4, 3, 1), (32, 128, 4, 4, 1)],
}
# MULTIROW: (BN, BK, num_warps) per M bucket 4..16 (M = 3..16); BM = bucket(M); BK is capped at next_pow2(K), and
# BK >= K loads whole W rows in one tile (no K loop; K = 1024 for the Qwen3-0.6B sites), a smaller BK loops over K.
# The W tile stays in registers as fp32: BN * BK / (32 * num_warps) per thread. One warp per program measured
# fastest on the H200 (no cross-warp reductions, hence no barriers between the rows); 4 and 8 warps lost everywhere.
# Measured (bf16, us, qkv N=4096 / gate_up N=6144, K=1024; Triton norm + cuBLAS in brackets):
#   [4,1024,1]: M=4 6.77 [6.94] / 8.12 [8.07]; M=8 8.49 [7.23] / 10.6 [8.07]; M=16 11.9 [7.32] / 19.4 [8.11].
# Only measured wins are ever dispatched, so the M = 8 / 16 configs cost pretune time and nothing else.
# STREAM: (BN, num_warps, programs per SM; 0 = one program per tile) per M bucket. The fastest launch shapes of the
# H200 sweep at M = 1 (benchmarks/sweep_decode_linear.py; us, qkv / gate_up / lm_head): (4, 4, 4) 4.51 / 5.49 / 87.1;
# (2, 2, 8) 4.56 / 5.55 / 82.5; (4, 2, 8) - / 6.05 / 75.2. At M = 4 it lost to cuBLAS (7.6-9.8 us against
# 5.5-6.1), so it is not a candidate there; M = 2 is unmeasured and shares the M = 1 list.
STREAM_CONFIGS: dict[int, list[tuple[int, int, int]]] = {
    1: [(4, 4, 4), (2, 2, 8), (4, 2, 8)],
    2: [(4, 4, 4), (2, 2, 8), (4, 2, 8)],
}
# SKINNY: (BN, KS, num_warps, fixup) per M bucket (M <= SKINNY_MAX_M); BM = max(16, bucket); K is split into
# cdiv(K, KS) chunks, summed by the split-K epilogue kernel (fixup 0) or inside the kernel by the last program of each
# n-tile (fixup 1). Measured on the H200 (benchmarks/bench_fusion_kernel.py --skinny-grid, bf16, us per call with the
# residual; Inductor norm + cuBLAS in brackets). Session 6 (results/fusion-skinny-fixup-h200.json, 11 launch shapes):
# (128, 512, 8, 1) fastest for qkv at M = 2-16 (4.86-5.20 [8.35-8.60], below cuBLAS alone: 5.2-5.3) and gate_up at
# M = 8-32 (6.76-8.07 [9.5-9.7]); (64, 256, 4, 1) for gate_up M = 2-4 (6.53-6.66 [9.4-9.5]); (128, 256, 8, 0) for
# qkv M = 32 (6.23 [8.91]); the fixup saved 0.3-1.3 us against the same shape with the epilogue kernel.
# Session 5 (results/fusion-skinny-h200.json): BN = 16-32 lost by 25-60 % to BN = 64 (more programs recompute the
# prologue per weight byte); a first design with whole-row W slabs (one [BN, 1024] chunk per program, no split) lost
# to the unfused path everywhere (qkv M = 16: 11.9 us against 7.3; results/fusion-skinny-slab-h200.json).
SKINNY_MAX_M = 32
# The W chunk [BN, KS] and activation tile [KS, BM] pass through shared memory for tl.dot (227 KiB per block on the
# H200); larger launch shapes are refused (ValueError; the dispatcher skips the candidate).
SKINNY_MAX_SMEM = 192 << 10
SKINNY_CONFIGS: dict[int, list[tuple[int, ...]]] = {b: [(128, 512, 8, 1), (64, 256, 4, 1), (128, 256, 8, 0),
                                                        (64, 512, 8, 1), (64, 256, 4, 0)] for b in (2, 4, 8, 16, 32)}
MULTIROW_CONFIGS: dict[int, list[tuple[int, int, int]]] = {
    4: [(4, 1024, 1), (2, 1024, 1), (8, 1024, 2)],
    8: [(4, 1024, 1), (2, 1024, 1), (8, 1024, 2)],
    16: [(4, 1024, 1), (2, 1024, 1)],
}


def m_bucket(m: int) -> int:
    """Next power of two >= m (1 for m <= 1): the M key of the dispatch cache."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


def gemv_configs(m: int) -> list[tuple[int, int, int]]:
    """GEMV configs (BN, BK, num_warps) for M rows; empty list when M > GEMV_MAX_M."""
    b = m_bucket(m)
    return list(GEMV_CONFIGS.get(b, [])) if b <= GEMV_MAX_M else []


def decode_configs(m: int) -> list[tuple[int, int, int, int, int]]:
    """Decode configs (BN, BK, num_warps, num_stages, use_dot) for M rows; empty when M > GEMV_MAX_M."""
    b = m_bucket(m)
    return list(DECODE_CONFIGS.get(b, [])) if b <= GEMV_MAX_M else []


def multirow_configs(m: int) -> list[tuple[int, int, int]]:
    """Multirow configs (BN, BK, num_warps) for M rows; empty unless 3 <= M <= GEMV_MAX_M (buckets 4, 8, 16)."""
    b = m_bucket(m)
    return list(MULTIROW_CONFIGS.get(b, [])) if b <= GEMV_MAX_M else []


def stream_configs(m: int) -> list[tuple[int, int, int]]:
    """Stream configs (BN, num_warps, programs per SM or 0) for M rows; empty unless M <= 2."""
    return list(STREAM_CONFIGS.get(m_bucket(m), []))


def skinny_configs(m: int) -> list[tuple[int, ...]]:
    """Skinny configs (BN, KS, num_warps, fixup) for M rows; empty unless 2 <= M <= SKINNY_MAX_M."""
    return list(SKINNY_CONFIGS.get(m_bucket(m), [])) if m <= SKINNY_MAX_M else []


def gemm_configs(m: int) -> list[tuple[int, int, int, int, int]]:
    """GEMM configs (BM, BN, BK, num_warps, num_stages) for M rows."""
    for limit, cfgs in GEMM_CONFIGS:
        if m <= limit:
            return list(cfgs)
    return list(GEMM_CONFIGS[-1][1])  # pragma: no cover


# The config list of each M-bucketed fused variant (fused_linear's default is the first) and its range of M.
_CONFIG_LISTS: dict[str, Callable[[int], list]] = {"gemv": gemv_configs, "decode": decode_configs,
                                                   "multirow": multirow_configs, "stream": stream_configs,
                                                   "skinny": skinny_configs}
_CONFIG_RANGE = {"gemv": f"M <= {GEMV_MAX_M}", "decode": f"M <= {GEMV_MAX_M}", "multirow": f"3 <= M <= {GEMV_MAX_M}",
                 "stream": "M <= 2", "skinny": f"2 <= M <= {SKINNY_MAX_M}"}


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


# Programmatic dependent launch for the "stream" kernel (CUDA Programming Guide, "Programmatic Dependent Launch and
# Synchronization"): the kernel may start while the previous kernel in the stream runs, loads its first W tile, then
# waits (griddepcontrol.wait) before it touches x, r, h or y. On by default on compute capability >= 9;
# COCONUT_PDL=0 at import turns it off. Measured on the H200 in a 28-layer batch-1 decode chain: 1.19x per step
# (benchmarks/bench_pdl_chain.py, with the engine's kernels doing the same). The engine also turns it off when its
# own NANOVLLM_PDL=0 (nanovllm/engine/model_runner.py).
PDL_ENABLED: bool = os.environ.get("COCONUT_PDL", "1") != "0"


def use_pdl(x: Tensor) -> bool:
    """Whether a stream launch on x's device uses PDL: PDL_ENABLED (looked up per call), CUDA, capability >= 9."""
    return PDL_ENABLED and x.is_cuda and _capability_major(x.device) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H200)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# The skinny variant's in-kernel split-K fixup counts, per n-tile, the programs that have written their partial:
# one int32 per tile, zero between launches (the last program of a tile resets its counter). One buffer per
# device, allocated on first use outside a CUDA graph capture and never freed (captured graphs keep its address);
# kernels that share it must not run concurrently on two streams (the engine and Inductor's code use one stream;
# PDL is safe: a kernel touches the counters only after griddepcontrol.wait).
FIXUP_COUNTERS = 1 << 16
_FIXUP_BUFFERS: dict[str, Tensor] = {}


_FIXUP_FALLBACK_LOGGED: set[str] = set()


def fixup_counters(device: torch.device, tiles: int) -> Optional[Tensor]:
    """The zeroed int32 [FIXUP_COUNTERS] counter buffer of `device` for a skinny launch with `tiles` n-tiles, or
    None (the caller then uses the split-K epilogue kernel; logged once per reason) when tiles > FIXUP_COUNTERS or
    the buffer does not exist yet and the current stream is capturing a CUDA graph (an allocation there would belong
    to the graph). Engines call it once before capturing (`fixup_counters(device, 0)` allocates it)."""
    key = str(device)
    buf = _FIXUP_BUFFERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _log_fixup_fallback(f"{key}: first use inside a CUDA graph capture")
            return None
        buf = _FIXUP_BUFFERS[key] = torch.zeros(FIXUP_COUNTERS, dtype=torch.int32, device=device)
    if tiles > buf.numel():
        _log_fixup_fallback(f"{key}: {tiles} n-tiles > FIXUP_COUNTERS = {buf.numel()}")
        return None
    return buf


def reset_fixup_counters() -> None:
    """Zero every device's fixup counters (in place: captured graphs keep their address). Each launch leaves them at
    zero; a launch that did not finish (an error mid-kernel) or two kernels sharing them on two streams could leave
    a count behind, which would make every later launch finish its tiles early, silently. Raises RuntimeError
    during a CUDA-graph capture (the zeroing would be recorded into the graph)."""
    if any(b.is_cuda for b in _FIXUP_BUFFERS.values()) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("reset_fixup_counters: not allowed while a CUDA graph is being captured")
    for buf in _FIXUP_BUFFERS.values():
        buf.zero_()


def _log_fixup_fallback(reason: str) -> None:
    if reason not in _FIXUP_FALLBACK_LOGGED:
        _FIXUP_FALLBACK_LOGGED.add(reason)
        log.info("coconut: split-K fixup off (%s); the epilogue kernel sums the splits", reason)


def _check_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; only variant='torch' is available")


def triton_rms_norm(x2d: Tensor, norm_weight: Tensor, eps: float, residual2d: Optional[Tensor] = None,
                    weight_in_fp32: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """One-pass Triton RMSNorm (+ residual add). x2d, residual2d: [M, K] contiguous; returns (a [M, K], h or None).

    Raises RuntimeError without triton. K up to 65536 (one block per row).
    """
    _check_triton()
    M, K = x2d.shape
    a = _new_buffer((M, K), x2d)
    h = _new_buffer((M, K), x2d) if residual2d is not None else None
    if M == 0:
        return a, h
    block = triton.next_power_of_2(K)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(M,)](x2d, residual2d if residual2d is not None else x2d, norm_weight, a,
                           h if h is not None else a, K, float(eps),
                           HAS_RES=residual2d is not None, WEIGHT_FP32=weight_in_fp32, BLOCK_K=block,
                           num_warps=warps)
    return a, h


def fused_linear(x2d: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                 residual2d: Optional[Tensor] = None, h_out: Optional[Tensor] = None, variant: str = "gemv",
                 config: Optional[tuple[int, ...]] = None) -> Tensor:
    """Launch one fused kernel: y = rms_norm(x (+ r)) * g @ W^T (+ b) -> [M, N] of x.dtype.

    Args:
        x2d, residual2d: [M, K] contiguous, same dtype. weight: [N, K] contiguous. bias: [N] or None. g: [K].
        h_out: [M, K] buffer that receives h = x + r (only with residual2d), or None to skip writing it.
        variant: "gemv", "decode", "multirow", "stream", "skinny" or "gemm". config: a tuple from gemv_configs /
            decode_configs / multirow_configs / stream_configs / skinny_configs / gemm_configs, or None for the
            first one.
    Raises:
        ValueError on an unknown variant, or no config given for an M outside the variant's list (gemv / decode:
        M > GEMV_MAX_M; multirow: M < 3 or M > GEMV_MAX_M; stream: M > 2; skinny: M < 2 or M > SKINNY_MAX_M), more
        rows than a config takes, or a skinny launch shape beyond SKINNY_MAX_SMEM.
    """
    _check_triton()
    M, K = x2d.shape
    N = weight.shape[0]
    y = _new_buffer((M, N), x2d)
    if M == 0 or N == 0:
        return y
    has_res = residual2d is not None
    write_h = has_res and h_out is not None
    r = residual2d if has_res else x2d
    b = bias if bias is not None else weight
    hb = h_out if write_h else y
    if config is None and variant != "gemm":
        cfgs = _CONFIG_LISTS[variant](M) if variant in _CONFIG_LISTS else None
        if cfgs is None:
            raise ValueError(f"unknown fused variant {variant!r}; expected one of {_FUSED}")
        if not cfgs:
            raise ValueError(f"{variant} variant has no configuration for M = {M} ({_CONFIG_RANGE[variant]}); "
                             "pass an explicit config")
        config = cfgs[0]
    if variant == "gemv":
        bm = min(m_bucket(M), GEMV_MAX_M)
        bn, bk, warps = config
        grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
        _fused_gemv_kernel[grid](x2d, r, norm_weight, weight, b, y, hb, M, N, K, float(eps),
                                 HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h,
                                 BM=bm, BN=bn, BK=bk, num_warps=warps)
    elif variant == "decode":
        bn, bk, warps, stages, use_dot = config
        bm = 16 if use_dot else min(m_bucket(M), GEMV_MAX_M)
        if M > bm:
            raise ValueError(f"decode variant handles at most {bm} rows with config {config}, got M={M}")
        _fused_decode_kernel[(triton.cdiv(N, bn),)](
            x2d, r, norm_weight, weight, b, y, hb, M, N, K, float(eps),
            HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h,
            BM=bm, BN=bn, BK=bk, USE_DOT=bool(use_dot), IEEE=x2d.dtype == torch.float32,
            num_warps=warps, num_stages=stages)
    elif variant == "multirow":
        bn, bk, warps = config
        bk = min(bk, triton.next_power_of_2(K))
        bm = m_bucket(M)
        if bm > GEMV_MAX_M:
            raise ValueError(f"multirow variant handles at most {GEMV_MAX_M} rows, got M={M}")
        _fused_multirow_kernel[(triton.cdiv(N, bn),)](
            x2d, r, norm_weight, weight, b, y, hb, M, N, K, float(eps),
            HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h,
            BM=bm, BN=bn, BK=bk, ONE_TILE=bk >= K, EVEN_K=bk == K, num_warps=warps)
    elif variant == "stream":
        bn, warps, per_sm = config
        bm = m_bucket(M)
        if bm > GEMV_MAX_M:
            raise ValueError(f"stream variant handles at most {GEMV_MAX_M} rows, got M={M}")
        tiles = triton.cdiv(N, bn)
        pdl = use_pdl(x2d)
        grid = tiles if per_sm <= 0 or not x2d.is_cuda else min(tiles, per_sm * _sm_count(x2d.device))
        _fused_stream_kernel[(grid,)](
            x2d, r, norm_weight, weight, b, y, hb, M, N, float(eps), K=K,
            HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h,
            BM=bm, BN=bn, BKP=triton.next_power_of_2(K), USE_PDL=pdl, num_warps=warps, num_stages=1,
            **({"launch_pdl": True} if pdl else {}))
    elif variant == "skinny":
        if len(config) not in (3, 4):
            raise ValueError(f"skinny variant: config must be (BN, KS, num_warps[, fixup]), got {config}")
        if K == 0:
            raise ValueError("skinny variant: K = 0 (empty reduction) is not supported")
        bn, ks, warps = config[:3]
        fixup = bool(config[3]) if len(config) == 4 else False
        if len(config) == 4 and config[3] not in (0, 1):  # True / False compare equal to 1 / 0
            raise ValueError(f"skinny variant: fixup must be 0 or 1, got {config}")
        if warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"skinny variant: num_warps must be 1, 2, 4, 8 or 16, got {config}")
        bm = max(16, m_bucket(M))
        ks = min(ks, max(16, triton.next_power_of_2(K)))
        if M > SKINNY_MAX_M:
            raise ValueError(f"skinny variant handles at most {SKINNY_MAX_M} rows, got M={M}")
        if bn < 16 or bn & (bn - 1) or ks < 16 or ks & (ks - 1):
            raise ValueError(f"skinny variant: BN and KS must be powers of two >= 16, got config {config}")
        if (bn + bm) * ks * x2d.element_size() > SKINNY_MAX_SMEM:
            raise ValueError(f"skinny variant: the [{bn}, {ks}] W chunk and [{ks}, {bm}] activation tile exceed "
                             f"{SKINNY_MAX_SMEM} bytes of shared memory")
        splits = triton.cdiv(K, ks)
        tiles = triton.cdiv(N, bn)
        counters = fixup_counters(x2d.device, tiles) if fixup and splits > 1 else None
        fixup = counters is not None  # no counters (first use inside a CUDA graph capture): the epilogue kernel
        part = _new_buffer((splits, M, N), x2d, torch.float32) if splits > 1 else y
        sq = (_new_buffer((tiles, splits, bm), x2d, torch.float32) if fixup
              else _new_buffer((splits, M), x2d, torch.float32) if splits > 1 else y)
        pdl = use_pdl(x2d)
        _fused_skinny_kernel[(tiles, splits)](
            x2d, r, norm_weight, weight, b, y, hb, part, sq, counters if fixup else sq, M, N, float(eps), K=K,
            HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h, SPLIT=splits > 1,
            IEEE=x2d.dtype == torch.float32, BM=bm, BN=bn, KS=ks, USE_PDL=pdl, FIXUP=fixup, S=splits,
            num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}))
        if splits > 1 and not fixup:
            block = 1024
            _fused_splitk_epilogue_kernel[(triton.cdiv(M * N, block),)](
                part, sq, b, y, M, N, float(eps), K=K, S=splits, HAS_BIAS=bias is not None, BLOCK=block,
                USE_PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    elif variant == "gemm":
        if config is None:
            config = gemm_configs(M)[0]
        bm, bn, bk, warps, stages = config
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _fused_gemm_kernel[grid](x2d, r, norm_weight, weight, b, y, hb, M, N, K, float(eps),
                                 HAS_RES=has_res, HAS_BIAS=bias is not None, WRITE_H=write_h,
                                 BM=bm, BN=bn, BK=bk, GROUP_M=8, IEEE=x2d.dtype == torch.float32,
                                 num_warps=warps, num_stages=stages)
    else:
        raise ValueError(f"unknown fused variant {variant!r}; expected one of {_FUSED}")
    return y


# --------------------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A dispatch decision: variant in ("unfused",) + _FUSED and its config tuple (() for unfused).

    times_us: the measured time per call of each candidate (microseconds), empty for heuristic choices.
    source: "measured", "heuristic", "loaded", "env", or "failed" (the measurement raised or no candidate ran: the
    unfused path, kept and never measured again, so a failing measurement costs once, not on every call).
    """

    variant: str
    config: tuple[int, ...] = ()
    source: str = "heuristic"
    times_us: tuple[tuple[str, float], ...] = ()


_CACHE: dict[tuple[int, int, int, str], Choice] = {}
_HEURISTIC = Choice("unfused", (), "heuristic")


def _key(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, str]:
    return (m_bucket(m), int(n), int(k), str(dtype).replace("torch.", ""))


def dispatch_table() -> dict[str, dict]:
    """The cached decisions: {"M=<bucket>,N=..,K=..,<dtype>": {variant, config, source, times_us}}."""
    return {f"M={k[0]},N={k[1]},K={k[2]},{k[3]}": {"variant": c.variant, "config": list(c.config),
                                                   "source": c.source, "times_us": dict(c.times_us)}
            for k, c in sorted(_CACHE.items())}


def clear_dispatch_cache() -> None:
    """Forget every cached decision (measured, loaded or heuristic)."""
    _CACHE.clear()


def save_tuning(path: str) -> None:
    """Write the measured/loaded decisions to a JSON file (list of rows)."""
    rows = [{"m_bucket": k[0], "n": k[1], "k": k[2], "dtype": k[3], "variant": c.variant, "config": list(c.config)}
            for k, c in _CACHE.items() if c.source in ("measured", "loaded")]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def load_tuning(path: str) -> int:
    """Read decisions written by `save_tuning`; returns the number loaded. Raises OSError / ValueError."""
    with open(path) as f:
        rows = json.load(f)
    for r in rows:
        if r["variant"] not in ("unfused",) + _FUSED:
            raise ValueError(f"bad variant in {path}: {r['variant']}")
        _CACHE[(int(r["m_bucket"]), int(r["n"]), int(r["k"]), str(r["dtype"]))] = Choice(
            r["variant"], tuple(r["config"]), "loaded")
    return len(rows)


def _env_choice(m: int) -> Optional[Choice]:
    v = os.environ.get("COCONUT_FUSION_VARIANT", "auto").strip().lower()
    if v in ("", "auto"):
        return None
    if v == "unfused":
        return Choice("unfused", (), "env")
    if v == "gemv":
        cfgs = gemv_configs(m)
        return Choice("gemv", cfgs[0], "env") if cfgs else Choice("gemm", gemm_configs(m)[0], "env")
    if v == "gemm":
        return Choice("gemm", gemm_configs(m)[0], "env")
    raise ValueError(f"COCONUT_FUSION_VARIANT={v!r}; expected auto, unfused, gemv or gemm")


def _graph_time_us(fn: Callable[[int], object], reps: int, iters: int = 7, warmup_calls: int = 2,
                   warmup_replays: int = 1) -> float:
    """Median time per call (us) of fn(i) for i in range(reps), captured in one CUDA graph and replayed.

    fn(0..warmup_calls-1) runs eagerly before the capture (compilation, allocator), and the graph is replayed
    warmup_replays times untimed before the `iters` timed replays. Needs a CUDA device.
    """
    g = capture_graph(fn, reps, warmup_calls, warmup_replays)
    times = [replay_ms(g) * 1e3 / reps for _ in range(iters)]
    del g
    return statistics.median(times)


def capture_graph(fn: Callable[[int], object], reps: int, warmup_calls: int = 2,
                  warmup_replays: int = 1) -> "torch.cuda.CUDAGraph":
    """fn(0..warmup_calls-1) eagerly, then one CUDA graph of fn(i) for i in range(reps), replayed warmup_replays
    times untimed (synchronized). Needs a CUDA device."""
    for i in range(warmup_calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    for _ in range(warmup_replays):
        g.replay()
    torch.cuda.synchronize()
    return g


def replay_ms(g: "torch.cuda.CUDAGraph") -> float:
    """Milliseconds of one replay of g, timed with CUDA events on the current stream (waits for it)."""
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def candidates(m: int) -> list[tuple[str, tuple[int, ...]]]:
    """All (variant, config) pairs the dispatcher measures for M rows (the unfused path first)."""
    out: list[tuple[str, tuple[int, ...]]] = [("unfused", ())]
    out += [("gemv", c) for c in gemv_configs(m)]
    out += [("decode", c) for c in decode_configs(m)]
    out += [("multirow", c) for c in multirow_configs(m)]
    out += [("stream", c) for c in stream_configs(m)]
    out += [("skinny", c) for c in skinny_configs(m)]
    out += [("gemm", c) for c in gemm_configs(m)]
    return out


def measure(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device | str = "cuda",
            reps: int = 10, l2_bytes: int = 120 << 20) -> Choice:
    """Time every candidate for an [m, k] x [n, k]^T site on `device` (a CUDA device) and return the fastest.

    Weights are rotated over enough copies to exceed `l2_bytes` (2x the H200's 60 MB L2) so they come from HBM,
    as in the real model. Each candidate is timed inside a CUDA graph of `reps` calls (median of 7 replays), with
    a residual input and the h = x + r output, the form of every site of a decoder but its first (measured on the
    H200: a variant can tie without the residual and lose by 14 % with it, e.g. multirow for gate_up at M = 4).
    A candidate that fails to compile or run is skipped (logged). Raises RuntimeError when called while the
    current stream is capturing a CUDA graph.
    """
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("coconut: refusing to benchmark while a CUDA graph is being captured")
    dev = torch.device(device)
    mb = m_bucket(m)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(mb, k, device=dev, dtype=dtype, generator=gen)
    r = torch.randn(mb, k, device=dev, dtype=dtype, generator=gen)
    h = torch.empty_like(x)
    g = 1.0 + 0.1 * torch.randn(k, device=dev, dtype=dtype, generator=gen)
    copies = max(1, min(16, math.ceil(l2_bytes / max(1, n * k * x.element_size()))))
    ws: list[Tensor] = []
    for _ in range(copies):
        try:
            ws.append(torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * k ** -0.5)
        except torch.cuda.OutOfMemoryError:
            if not ws:
                raise
            break  # fewer copies: L2 may then flatter every candidate alike
    copies = len(ws)
    times: dict[str, float] = {}
    best: Optional[tuple[float, str, tuple[int, ...]]] = None
    for variant, cfg in candidates(mb):
        name = variant + ("" if not cfg else str(list(cfg)).replace(" ", ""))
        try:
            if variant == "unfused":
                def fn(i: int) -> object:
                    a, _ = triton_rms_norm(x, g, 1e-6, residual2d=r)
                    return F.linear(a, ws[i % copies])
            else:
                def fn(i: int, variant: str = variant, cfg: tuple[int, ...] = cfg) -> object:
                    return fused_linear(x, g, ws[i % copies], None, 1e-6, residual2d=r, h_out=h, variant=variant,
                                        config=cfg)
            t = _graph_time_us(fn, reps)
        except Exception as e:  # a config that does not compile (e.g. shared memory) is simply not a candidate
            log.warning("coconut: candidate %s failed for M=%d N=%d K=%d: %s", name, mb, n, k, e)
            continue
        times[name] = round(t, 3)
        if best is None or t < best[0]:
            best = (t, variant, cfg)
    if best is None:
        return Choice("unfused", (), "heuristic")
    return Choice(best[1], best[2], "measured", tuple(times.items()))


def choose(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Choice:
    """The dispatch decision for a CUDA site; measures on first use unless a CUDA graph is being captured (and
    then rewrites the file named by the environment variable ``COCONUT_TUNING_FILE``, when set).

    Order: COCONUT_FUSION_VARIANT env override; cached (measured/pre-tuned/loaded) decision; measurement (not while
    capturing; COCONUT_AUTOTUNE=0 disables it); otherwise the heuristic "unfused" (the safe default: a fused
    kernel is only used where it was measured to win).
    """
    env = _env_choice(m)
    if env is not None:
        return env
    key = _key(m, n, k, dtype)
    c = _CACHE.get(key)
    if c is not None and c.source != "heuristic":
        return c
    if torch.cuda.is_current_stream_capturing() or os.environ.get("COCONUT_AUTOTUNE", "1") == "0":
        return c or _HEURISTIC
    try:
        c = measure(m, n, k, dtype, device)
    except Exception as e:  # e.g. out of memory while the KV cache holds the GPU: fall back, do not crash
        log.warning("coconut: measuring M<=%d N=%d K=%d failed (%s); using the unfused path", key[0], n, k, e)
        c = Choice("unfused", (), "failed")
    if c.source == "heuristic":  # no candidate ran: keep the fallback instead of measuring again on every call
        c = Choice("unfused", (), "failed")
    _CACHE[key] = c
    log.info("coconut: M<=%d N=%d K=%d %s -> %s %s %s", key[0], n, k, key[3], c.variant, c.config, c.times_us)
    path = os.environ.get("COCONUT_TUNING_FILE")
    if path and c.source == "measured":  # keep the decisions measured on first use too (prefill sizes)
        try:
            save_tuning(path)
        except OSError as e:
            log.warning("coconut: could not save the tuning file %s: %s", path, e)
    return c


def pretune(shapes: Iterable[tuple[int, int, int]], dtype: torch.dtype = torch.bfloat16,
            device: torch.device | str = "cuda") -> dict[str, dict]:
    """Measure and cache the dispatch decision for each (M, N, K) (M is bucketed to the next power of two).

    Call before capturing CUDA graphs (the engine does, for its batch sizes and its qkv / gate_up / lm_head
    shapes). Returns `dispatch_table()`. Raises RuntimeError if called during graph capture or without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("coconut.pretune needs CUDA")
    for m, n, k in shapes:
        key = _key(m, n, k, dtype)
        if key in _CACHE and _CACHE[key].source in ("measured", "loaded"):
            continue
        c = measure(key[0], n, k, dtype, device)
        _CACHE[key] = c
        log.info("coconut pretune: M<=%d N=%d K=%d -> %s %s", key[0], n, k, c.variant, c.config)
    return dispatch_table()


# --------------------------------------------------------------------------------------------------------------
# The public entry point used by the custom ops
# --------------------------------------------------------------------------------------------------------------


def rms_norm_linear(
    x2d: Tensor,
    norm_weight: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    eps: float,
    residual2d: Optional[Tensor] = None,
    weight_in_fp32: bool = False,
    variant: str = "auto",
    config: Optional[tuple[int, ...]] = None,
) -> tuple[list[Tensor], Optional[Tensor]]:
    """(residual add +) RMSNorm -> several linears. Returns ([y_i: [M, N_i]], h: [M, K] or None).

    Args:
        x2d: [M, K] activations (fp32/bf16/fp16); residual2d: [M, K] same dtype or None.
        norm_weight: [K]; weights: list of [N_i, K]; biases: list of [N_i] or None (same length as weights).
        eps: float added to mean(h^2). weight_in_fp32: see `reference_rms_norm`.
        variant: "auto" (CUDA: dispatcher; CPU: "torch"), "torch", "unfused", "gemv", "decode", "multirow",
            "stream", "skinny", "gemm". A Triton variant on CPU tensors runs in the Triton interpreter
            (TRITON_INTERPRET=1 must be set before triton import).
        config: kernel config for a forced fused variant (None = first of its list).
    Raises:
        ValueError: mismatched shapes/dtypes or unknown variant.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [M, K], got {tuple(x2d.shape)}")
    M, K = x2d.shape
    if len(weights) != len(biases):
        raise ValueError("weights and biases must have the same length")
    if norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"weight must be [N, {K}], got {tuple(w.shape)}")
    if residual2d is not None and residual2d.shape != x2d.shape:
        raise ValueError("residual must have the shape of x")
    if variant not in ("auto",) + VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    if variant == "auto" and not x2d.is_cuda:
        variant = "torch"
    if variant == "torch":
        return reference_rms_norm_linear(x2d, norm_weight, weights, biases, eps, residual2d, weight_in_fp32)

    x2d = x2d.contiguous()
    residual2d = residual2d.contiguous() if residual2d is not None else None
    norm_weight = norm_weight.contiguous()
    if variant == "auto":
        choices = [choose(M, w.shape[0], K, x2d.dtype, x2d.device) for w in weights]
    else:
        choices = [Choice(variant, tuple(config) if config is not None else (), "forced") for _ in weights]
    # weight_in_fp32 with a low-precision weight differs from the Llama chain only in rounding, which the fused
    # kernels do not reproduce anyway (the GEMV-shaped ones keep h*g in fp32, the tl.dot ones round it once to the
    # activation dtype); so it only matters for the unfused path.
    ys: list[Optional[Tensor]] = [None] * len(weights)
    h: Optional[Tensor] = None
    if any(c.variant == "unfused" for c in choices):
        a, h = triton_rms_norm(x2d, norm_weight, eps, residual2d, weight_in_fp32)
        for i, (w, b, c) in enumerate(zip(weights, biases, choices)):
            if c.variant == "unfused":
                ys[i] = F.linear(a, w, b)
    if residual2d is not None and h is None:
        h = _new_buffer((M, K), x2d)
        h_pending = True
    else:
        h_pending = False
    for i, (w, b, c) in enumerate(zip(weights, biases, choices)):
        if c.variant != "unfused":
            ys[i] = fused_linear(x2d, norm_weight, w.contiguous(), b, eps, residual2d,
                                 h if h_pending else None, c.variant, c.config or None)
            h_pending = False
    return [y for y in ys if y is not None], h
