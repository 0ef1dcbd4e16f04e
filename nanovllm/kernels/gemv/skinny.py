"""The split-K skinny kernel of the engine's small-M linear, on the tensor cores, for 1 <= M <= 32 rows.

Split-K "swap-AB": program ``(n, s)`` multiplies one ``[BLOCK_N, CHUNK_K]`` chunk of ``W`` (one load, the MMA's wide
side) by the matching chunk of ``act(x)`` transposed to ``[CHUNK_K, BM]`` (``M`` padded with zero rows to ``BM = 16``
or ``32``) into fp32 partials ``[splits, M, N]``; ``_splitk_reduce_kernel`` sums them, adds the bias and rounds once,
or (``SkinnyConfig.fixup``) the last program of each n-tile does it inside the kernel (a per-tile arrival counter;
the counters are fusion_pass's, one buffer per device). The activation is rounded to ``x``'s dtype before the MMA,
as the eager model rounds it. The fused norm -> linear op of ``fusion_pass`` has a twin of it
(``fusion_pass.kernels.skinny``: the norm in the prologue, 1/rms applied where the splits are summed);
``fusion_pass`` never imports ``nanovllm``, hence two kernels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusion_pass.kernels import fixup_counters
from fusion_pass.launch import cdiv, launch_options, next_power_of_2, use_pdl

from .common import _act, check_launch

class SkinnyConfig(NamedTuple):
    """Launch configuration of the split-K skinny kernel (``_gemv_skinny_kernel``): ``block_n`` W rows per program
    (>= 16: the MMA's M side), ``chunk_k`` columns of K per program (a power of two >= 16; ``cdiv(K, chunk_k)`` splits
    of K), ``num_warps``; ``fixup``: the splits are summed inside the kernel by the last program of each n-tile
    instead of by a second kernel."""

    block_n: int
    chunk_k: int
    num_warps: int
    fixup: bool = False


SKINNY_MAX_M = 32  # the most rows of the skinny kernel (BM = max(16, next_power_of_2(M)) <= 32)
SKINNY_MAX_SMEM = 192 << 10  # the W chunk and activation tile pass through shared memory (227 KiB per block on sm_90)
SKINNY_DEFAULT = SkinnyConfig(32, 256, 4)
# The launch shapes a kernel benchmark sweeps (the per-GPU choices are in dispatch.py).
SKINNY_CHOICES: tuple[SkinnyConfig, ...] = (
    SkinnyConfig(16, 256, 2), SkinnyConfig(16, 256, 4), SkinnyConfig(16, 512, 4), SkinnyConfig(16, 512, 8),
    SkinnyConfig(16, 1024, 8), SkinnyConfig(32, 256, 4), SkinnyConfig(32, 512, 4), SkinnyConfig(32, 512, 8),
    SkinnyConfig(64, 256, 4),
    # the in-kernel split-K fixup instead of the reduction kernel
    SkinnyConfig(32, 256, 4, True), SkinnyConfig(64, 256, 4, True), SkinnyConfig(64, 128, 4, True),
    SkinnyConfig(128, 256, 8, True), SkinnyConfig(128, 512, 8, True),
)


@triton.jit
def _gemv_skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, p_ptr, c_ptr, M, N, stride_xm, stride_ym,
                        K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr,
                        USE_PDL: tl.constexpr = False, FIXUP: tl.constexpr = False, S: tl.constexpr = 1):
    """Split-K skinny GEMM on the tensor cores, swap-AB: program (pid_n, s) computes
    W[pid_n*BN : +BN, s*KS : +KS] @ act(x)[:M, s*KS : +KS]^T -> [BN, BM] (M <= BM, BM >= 16, rows >= M are zeros).

    The weight chunk is the MMA's left operand (its BN >= 16 rows fill the MMA's M side) and the few activation
    rows the right one: a small-M product computed as its transpose. ONE load of the [BN, KS] chunk (KS a power of
    two; K a compile-time constant), then the activation chunk [KS, BM] (gate | up for silu_mul, L2-resident).
    SPLIT: the fp32 partial goes to p[s, m, n] ([S, M, N], reduced by ``_splitk_reduce_kernel``); otherwise (one
    chunk covers K) bias is added and y[m, n] stored. FIXUP (with SPLIT, S = cdiv(K, KS)): no reduction kernel; the
    last of the S programs of an n-tile to increment its counter c[pid_n] (int32, zero before the launch; one
    acq_rel atomic after a CTA barrier) sums the tile's partials in a fixed order, adds the bias, stores y and resets
    the counter (Stream-K's "fixup", arXiv 2301.03598; see ``fusion_pass.kernels.skinny``).
    USE_PDL: the weight chunk is loaded before waiting for the previous kernel (fusion_pass/launch.py).
    """
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    rk = s * KS + tl.arange(0, KS)
    k_mask = rk < K
    w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rm = tl.arange(0, BM)
    m_mask = rm < M
    xt_off = rm[None, :].to(tl.int64) * stride_xm + rk[:, None]  # [KS, BM]: act(x)^T, K along the rows
    xt_mask = k_mask[:, None] & m_mask[None, :]
    first = tl.load(x_ptr + xt_off, mask=xt_mask, other=0.0)
    if ACT == "silu_mul":
        second = tl.load(x_ptr + xt_off + K, mask=xt_mask, other=0.0)
    else:
        second = first
    a = _act(first, second, ACT).to(w.dtype)
    if IEEE:
        acc = tl.dot(w, a, input_precision="ieee")
    else:
        acc = tl.dot(w, a)
    if SPLIT:
        nm_mask = n_mask[:, None] & m_mask[None, :]
        p_off = rm[None, :].to(tl.int64) * N + rn64[:, None]  # [BN, BM] offsets in one [M, N] slice of p
        tl.store(p_ptr + (s * M).to(tl.int64) * N + p_off, acc, mask=nm_mask)
        if FIXUP:
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(c_ptr + pid_n, 1, sem="acq_rel")
            if arrived == S - 1:  # the last program of this n-tile sums the S partials in a fixed order
                tot = tl.zeros((BN, BM), dtype=tl.float32)
                if HAS_BIAS:  # bias first: the sums of _splitk_reduce_kernel, bit for bit
                    tot += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                for t in tl.static_range(S):
                    tot += tl.load(p_ptr + (t * M).to(tl.int64) * N + p_off, mask=nm_mask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn64[:, None], tot.to(y_ptr.dtype.element_ty),
                         mask=nm_mask)
                tl.atomic_xchg(c_ptr + pid_n, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn64[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, M, N, stride_ym, S: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[m, n] = sum_s p[s, m, n] (+ b[n]), rounded once to y's dtype. p: [S, M, N] fp32 contiguous; BLOCK
    consecutive (m, n) elements per program. USE_PDL: the bias is loaded before waiting for the split kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    n = offs % N
    if HAS_BIAS:
        acc = tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    p = p_ptr + offs.to(tl.int64)  # advanced by one [M, N] slice per split (64-bit)
    for s in tl.static_range(S):
        acc += tl.load(p, mask=mask, other=0.0)
        p += M * N
    m = offs // N
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)



def gemv_skinny_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    out: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``y = act(x) @ weight^T (+ bias)`` for ``1 <= M <= SKINNY_MAX_M`` rows on the tensor cores (split-K skinny
    kernel; when K is split, the splits are summed by one reduction kernel, or inside the kernel with
    ``config.fixup``); CUDA-graph capturable (the fp32 ``[splits, M, N]`` partial buffer is allocated per call, from
    the graph's pool under capture; the fixup's counters are one persistent buffer per device,
    ``fusion_pass.kernels.fixup_counters``, allocated on first use outside a capture; a first use inside one falls
    back to the reduction kernel).

    Args:
        x, weight, bias, act, out: as :func:`gemv_triton` (``x.stride(1) == 1``, weight contiguous).
        config: a :class:`SkinnyConfig` (default :data:`SKINNY_DEFAULT`).

    Returns:
        ``[M, N]`` in ``x.dtype``; the activation is rounded to ``x.dtype`` before the MMA (as the eager model
        rounds it), products accumulate in float32 and the splits are summed in float32.

    Raises:
        ValueError: as :func:`gemv_triton`, ``M > SKINNY_MAX_M``, a config with ``block_n < 16`` or a
            ``chunk_k`` that is not a power of two >= 16, ``num_warps`` not 1, 2, 4, 8 or 16, ``fixup`` not a bool
            (or 0 / 1), or one whose tiles exceed :data:`SKINNY_MAX_SMEM`.
    """
    cfg = config if config is not None else SKINNY_DEFAULT
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1) or cfg.chunk_k < 16 or cfg.chunk_k & (cfg.chunk_k - 1):
        raise ValueError(f"block_n and chunk_k must be powers of two >= 16, got {cfg}")
    if cfg.num_warps not in (1, 2, 4, 8, 16) or cfg.fixup not in (0, 1):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16 and fixup a bool, got {cfg}")
    m, n, k, out = check_launch(x, weight, bias, act, out, SKINNY_MAX_M,
                                 "the skinny kernel takes at most SKINNY_MAX_M")
    if m == 0 or n == 0:
        return out
    chunk = min(cfg.chunk_k, max(16, next_power_of_2(k)))
    bm = max(16, next_power_of_2(m))
    if (cfg.block_n + bm) * chunk * x.element_size() > SKINNY_MAX_SMEM:
        raise ValueError(f"the skinny kernel's [{cfg.block_n}, {chunk}] W chunk and [{chunk}, {bm}] activation tile "
                         f"exceed {SKINNY_MAX_SMEM} bytes of shared memory; lower block_n or chunk_k")
    splits = cdiv(k, chunk)
    tiles = cdiv(n, cfg.block_n)
    counters = None
    if cfg.fixup and splits > 1:
        counters = fixup_counters(x.device, tiles)  # None on first use inside a capture: the reduction kernel
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    pdl = use_pdl(x)
    b = bias if bias is not None else weight  # never read without HAS_BIAS
    _gemv_skinny_kernel[(tiles, splits)](
        x, weight, b, out, part, counters if counters is not None else part, m, n, x.stride(0), out.stride(0), K=k,
        ACT=act, HAS_BIAS=bias is not None, SPLIT=splits > 1, IEEE=x.dtype == torch.float32, BM=bm, BN=cfg.block_n,
        KS=chunk, USE_PDL=pdl, FIXUP=counters is not None, S=splits, num_warps=cfg.num_warps, num_stages=1,
        **launch_options(pdl))
    if splits > 1 and counters is None:
        block = 1024
        _splitk_reduce_kernel[(cdiv(m * n, block),)](part, b, out, m, n, out.stride(0), S=splits,
                                                            HAS_BIAS=bias is not None, BLOCK=block, USE_PDL=pdl,
                                                            num_warps=4, **launch_options(pdl))
    return out

