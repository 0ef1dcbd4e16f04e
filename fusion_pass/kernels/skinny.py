"""The "skinny" fused variant: add + RMSNorm + split-K GEMM on the tensor cores for a few rows (M = 2-32).

Split-K "swap-AB": each program multiplies a [BN, KS] chunk of W (the MMA's wide side) by the chunk of a = h * g
[KS, BM] (M padded to BM >= 16) into fp32 partials and per-chunk sums of squares. The splits are summed, and 1/rms
and the bias applied, either by a second kernel (the split-K epilogue) or inside the kernel by the last program of
each n-tile to finish (the "fixup", with one arrival counter per tile). The engine's plain linears have a twin of
this kernel (nanovllm.kernels.gemv.skinny, an activation instead of the norm); fusion_pass never imports nanovllm,
so the chunk indexing is written in both, and the fixup counters below serve both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv, launch_options, next_power_of_2, use_pdl
from ..launch_cache import LaunchCache
from .common import log, m_bucket, new_buffer
from .segments import pick_segment, segment_args

SKINNY_MAX_M = 32  # the most rows of one launch (BM = max(16, next_power_of_2(M)) <= 32)
# The W chunk [BN, KS] and activation tile [KS, BM] pass through shared memory for tl.dot (227 KiB per block on
# sm_90); larger launch shapes are refused (ValueError; the dispatcher skips the candidate).
SKINNY_MAX_SMEM = 192 << 10
# (BN, KS, num_warps, fixup) per M bucket: the candidates the dispatcher measures (K split into cdiv(K, KS) chunks;
# fixup 1 sums them in the kernel, 0 in the epilogue kernel).
SKINNY_CONFIGS: dict[int, list[tuple[int, ...]]] = {b: [(128, 512, 8, 1), (64, 256, 4, 1), (128, 256, 8, 0),
                                                        (64, 512, 8, 1), (64, 256, 4, 0)] for b in (2, 4, 8, 16, 32)}


def skinny_configs(m: int) -> list[tuple[int, ...]]:
    """Skinny configs (BN, KS, num_warps, fixup) for M rows; empty unless 2 <= M <= SKINNY_MAX_M."""
    return list(SKINNY_CONFIGS.get(m_bucket(m), [])) if m <= SKINNY_MAX_M else []


@triton.jit(do_not_specialize=["N1", "N2"])
def _fused_skinny_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, p_ptr, q_ptr, c_ptr, M, N, eps,
                         K: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                         SPLIT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         KS: tl.constexpr, USE_PDL: tl.constexpr = False, FIXUP: tl.constexpr = False,
                         S: tl.constexpr = 1, G: tl.constexpr = 1, w1_ptr=None, w2_ptr=None, b1_ptr=None,
                         b2_ptr=None, y1_ptr=None, y2_ptr=None, N1=0, N2=0):
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
    kernel (nanovllm.kernels.gemv.skinny, an activation instead of the norm); fusion_pass never
    imports nanovllm, so the chunk indexing below is written in both.
    G > 1 (a weight group, see segments.py): (w, b, y, N) is segment 0, (w1, b1, y1, N1) and (w2, b2, y2, N2) the
    others; pid_n numbers the n-tiles across the segments (cdiv(N_i, BN) each), each tile computes its own
    segment's y, and segment i's partials are the [S, M, N_i] block of p at S * M * (N_0 + .. + N_{i-1}).
    """
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    tt, N, w_ptr, b_ptr, y_ptr, col = pick_segment(pid_n, tl.cdiv(N, BN), tl.cdiv(N1, BN), N, N1, N2, w_ptr, w1_ptr,
                                                   w2_ptr, b_ptr, b1_ptr, b2_ptr, y_ptr, y1_ptr, y2_ptr, G)
    p_ptr += (col.to(tl.int64) * M) * S  # this segment's [S, M, N] partials
    rn = tt * BN + tl.arange(0, BN)
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

@triton.jit(do_not_specialize=["N1", "N2"])
def _fused_splitk_epilogue_kernel(p_ptr, q_ptr, b_ptr, y_ptr, M, N, eps, K: tl.constexpr, S: tl.constexpr,
                                  HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
                                  G: tl.constexpr = 1, w1_ptr=None, w2_ptr=None, b1_ptr=None, b2_ptr=None,
                                  y1_ptr=None, y2_ptr=None, N1=0, N2=0):
    """The skinny variant's split-K epilogue: y[m, n] = (sum_s p[s, m, n]) * 1/rms(h_m) + b[n], with
    1/rms(h_m) = rsqrt(sum_s q[s, m] / K + eps). p: [S, M, N], q: [S, M] fp32; y: [M, N]; BLOCK consecutive
    (m, n) per program; one rounding to y's dtype. USE_PDL: b is loaded before waiting for the split kernel.
    G > 1: the programs are numbered across the segments (cdiv(M * N_i, BLOCK) each; the w pointers are unused),
    each segment's p block at S * M * its first column."""
    tt, N, _w, b_ptr, y_ptr, col = pick_segment(tl.program_id(0), tl.cdiv(M * N, BLOCK), tl.cdiv(M * N1, BLOCK), N,
                                                N1, N2, y_ptr, y1_ptr, y2_ptr, b_ptr, b1_ptr, b2_ptr, y_ptr, y1_ptr,
                                                y2_ptr, G)
    p_ptr += (col.to(tl.int64) * M) * S
    offs = tt * BLOCK + tl.arange(0, BLOCK)
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



# The skinny variant's in-kernel split-K fixup counts, per n-tile, the programs that have written their partial:
# one int32 per tile, zero between launches (the last program of a tile resets its counter). One buffer per
# device, allocated on first use outside a CUDA graph capture and never freed (captured graphs keep its address);
# kernels that share it must not run concurrently on two streams (the engine and Inductor's code use one stream;
# PDL is safe: a kernel touches the counters only after griddepcontrol.wait; the dispatcher's concurrent first calls,
# compile_ahead.py, zero the counters after them).
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


def launch_skinny(x2d: Tensor, residual2d: Optional[Tensor], norm_weight: Tensor, weights: Sequence[Tensor],
                  biases: Sequence[Optional[Tensor]], ys: Sequence[Tensor], h_out: Optional[Tensor], eps: float,
                  config: tuple[int, ...]) -> None:
    """Write every y_i [M, N_i] (and h_out = x + r when both are given) with ONE split-K launch over a group of 1 to
    MAX_GROUP weights (segments.py), plus its epilogue kernel unless the fixup runs; shapes as
    :func:`fusion_pass.kernels.fused_linears`. config: (BN, KS, num_warps[, fixup]).

    Raises:
        ValueError: a config not of 3 or 4 ints, fixup not 0/1, num_warps not 1-16 (a power of two), BN or KS not a
            power of two >= 16, M > SKINNY_MAX_M, K = 0, tiles beyond SKINNY_MAX_SMEM, or a group the kernel
            cannot take (segments.segment_args).
    """
    M, K = x2d.shape
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
    ks = min(ks, max(16, next_power_of_2(K)))
    if M > SKINNY_MAX_M:
        raise ValueError(f"skinny variant handles at most {SKINNY_MAX_M} rows, got M={M}")
    if bn < 16 or bn & (bn - 1) or ks < 16 or ks & (ks - 1):
        raise ValueError(f"skinny variant: BN and KS must be powers of two >= 16, got config {config}")
    if (bn + bm) * ks * x2d.element_size() > SKINNY_MAX_SMEM:
        raise ValueError(f"skinny variant: the [{bn}, {ks}] W chunk and [{ks}, {bm}] activation tile exceed "
                         f"{SKINNY_MAX_SMEM} bytes of shared memory")
    ws, bs, outs, ns = segment_args(weights, biases, ys)
    tiles = sum(cdiv(n, bn) for n in ns)
    g = len(weights)
    n_total = sum(ns)
    has_res = residual2d is not None
    write_h = has_res and h_out is not None
    has_bias = biases[0] is not None
    r = residual2d if has_res else x2d
    hb = h_out if write_h else outs[0]
    splits = cdiv(K, ks)
    counters = fixup_counters(x2d.device, tiles) if fixup and splits > 1 else None
    fixup = counters is not None  # no counters (first use inside a CUDA graph capture): the epilogue kernel
    part = new_buffer((splits, M, n_total), x2d, torch.float32) if splits > 1 else outs[0]
    sq = (new_buffer((tiles, splits, bm), x2d, torch.float32) if fixup
          else new_buffer((splits, M), x2d, torch.float32) if splits > 1 else outs[0])
    pdl = use_pdl(x2d)
    # every parameter of each kernel, in signature order (LaunchCache's contract); the group's segments 1 and 2,
    # or the defaults of an ungrouped launch
    rest = (ws[1], ws[2], bs[1], bs[2], outs[1], outs[2]) if g > 1 else (None,) * 6
    key = (M, K, tuple(ns), config, ks, splits, fixup, has_res, has_bias, write_h, pdl, x2d.dtype, ws[0].dtype,
           norm_weight.dtype, r.dtype, hb.dtype, bs[0].dtype if has_bias else None)
    args = (x2d, r, norm_weight, ws[0], bs[0], outs[0], hb, part, sq, counters if fixup else sq, M, ns[0], float(eps),
            K, has_res, has_bias, write_h, splits > 1, x2d.dtype == torch.float32, bm, bn, ks, pdl, fixup, splits, g,
            *rest, ns[1], ns[2])
    _SKINNY_LAUNCHES.launch(key, (tiles, splits), args, dict(num_warps=warps, num_stages=1, **launch_options(pdl)))
    if splits > 1 and not fixup:
        block = 1024
        blocks = sum(cdiv(M * n, block) for n in ns)
        args = (part, sq, bs[0], outs[0], M, ns[0], float(eps), K, splits, has_bias, block, pdl, g, *rest, ns[1],
                ns[2])
        _EPILOGUE_LAUNCHES.launch(key, (blocks,), args, dict(num_warps=4, **launch_options(pdl)))


_SKINNY_LAUNCHES = LaunchCache(_fused_skinny_kernel)
_EPILOGUE_LAUNCHES = LaunchCache(_fused_splitk_epilogue_kernel)
