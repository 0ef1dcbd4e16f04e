"""Small-M GEMV with an optional SwiGLU prologue (Triton kernel + launcher + PyTorch reference).

Computes ``y[M, N] = act(x)[M, K] @ W[N, K]^T (+ b)`` for decode-sized ``M`` (at most :data:`MAX_M` rows for the
GEMV, :data:`SKINNY_MAX_M` for the skinny kernel), where

    act = "none":      act(x) = x                                  x: [M, K]
    act = "silu_mul":  act(x)_k = silu(gate_k) * up_k              x: [M, 2K] = [gate | up]  (SwiGLU,
                       silu(g) = g / (1 + exp(-g)), in float32      Shazeer 2020, arXiv 2002.05202)

``[gate | up]`` is how the model's merged ``gate_up_proj`` lays out its output (MergedColumnParallelLinear
with ``out_sizes = [I, I]``: gate rows first, then up rows, per tensor-parallel rank), so the MLP's
``down_proj`` reads the ``gate_up`` output directly and the separate SiLU-and-mul kernel disappears.

Why a GEMV: at decode (``M`` = 1-4) these products only stream the weight once, and cuBLAS's kernel choice
for ``N = 1024`` outputs (Qwen3-0.6B's o_proj and down_proj) leaves most of the H200's bandwidth unused
(12.3 us for down_proj's 6.3 MB, a 1.5 us bytes floor). The kernel here is built for the bandwidth:

- Grid ``(cdiv(N, BLOCK_N),)``: each program owns ``BLOCK_N`` (4 or 8) output features and ALL ``M`` rows,
  so ``W`` is read from HBM exactly once whatever ``M`` is.
- When ``BLOCK_K >= K`` ("one tile", the usual case up to ``K`` = 4096) the program loads its whole
  ``[BLOCK_N, K]`` slab of ``W`` with one ``tl.load`` (16-byte vectors along ``K``, ``evict_first``: it is
  never reused), so every byte the program needs is in flight at once; no ``tl.dot`` (M is far below the
  16-row minimum of the tensor cores), float32 accumulation.
- The ``M`` rows are a ``tl.static_range(BLOCK_M)`` loop (``BLOCK_M = next_power_of_2(M)``, rows ``>= M``
  skipped by a scalar branch) over the ``W`` slab held in registers: per row, load ``x`` (tiny, L2-resident,
  the next row's load issued before this row's reductions so its latency overlaps them), apply ``act`` in
  float32, ``tl.sum(W * a, axis=1)`` and store the row. There is no ``[M, N, K]`` broadcast product (it spills
  at ``M >= 4``).
- ``K > BLOCK_K`` (longer rows): a loop over ``K`` chunks of half that size with a float32 ``[BLOCK_N,
  BLOCK_M]`` accumulator; the next chunk of ``W`` is requested before the current one is used (register double
  buffering: Triton's ``num_stages`` pipelines only loads that feed ``tl.dot``).

``M = 1`` (batch-1 decode) runs a second kernel, ``_gemv_row_kernel``: each program loads its ``[BLOCK_N,
next_power_of_2(K)]`` slab of whole ``W`` rows in one request (up to 128 weight elements per thread) and reduces the
one row of ``x``; measured fastest on the H200 by benchmarks/sweep_decode_linear.py (o_proj 3.24 us against 3.34,
down_proj with SwiGLU 4.78 us against 5.39 for the kernel above; cuBLAS 12.9 / 6.8), with 4 warps and 1 (K <= 2048)
or 4 (longer rows) outputs per program (:func:`row_config`).

``act`` is recomputed by every program (each reads the whole ``x`` row anyway): that costs ``M * K * N /
BLOCK_N`` sigmoids, hidden under the weight stream at small ``M`` but not at ``M = 16``; hence ``BLOCK_N = 8``
for ``M >= 3`` where the slab still fits in registers (see :func:`choose_config`).

``3 <= M <= 32`` (session 5) on the GPU runs a third kernel, ``_gemv_skinny_kernel`` (:func:`gemv_skinny_triton`):
split-K "swap-AB" on the tensor cores. Program ``(n, s)`` multiplies one ``[BLOCK_N, CHUNK_K]`` chunk of ``W`` (one
load, the MMA's wide side) by the matching chunk of ``act(x)`` transposed to ``[CHUNK_K, BM]`` (``M`` padded with
zero rows to ``BM = 16`` or ``32``) into fp32 partials ``[splits, M, N]``; ``_splitk_reduce_kernel`` sums them, adds
the bias and rounds once, or (``SkinnyConfig.fixup``, session 6) the last program of each n-tile does it inside the
kernel (a per-tile arrival counter; the counters are fusion_pass's, one buffer per device). The activation is rounded
to ``x``'s dtype before the MMA, as the eager model rounds it. Measured on the H200 (:func:`skinny_config`): o_proj
4.0-4.8 us at M = 4-32 against cuBLAS's 6.0-11.8, down_proj with SwiGLU and the fixup 5.2-7.2 us against 11.1-11.4
for SiLU-and-mul then cuBLAS. The fused norm -> linear op of ``fusion_pass`` has a twin of it
(``_fused_skinny_kernel``: the norm in the prologue, 1/rms applied where the splits are summed); ``fusion_pass``
never imports ``nanovllm``, hence two kernels.

Public API: :func:`gemv` (Triton on CUDA / ``force_triton``, reference otherwise), :func:`gemv_triton`,
:func:`gemv_skinny_triton`, :func:`skinny_config`, :func:`gemv_ref`, :func:`apply_act`, :func:`choose_config`.
Benchmark: benchmarks/bench_gemv.py (``--skinny`` for the skinny kernel's launch shapes).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import launch_options, use_pdl

ACTS = ("none", "silu_mul")
MAX_M = 16  # the most rows one launch takes (BLOCK_M = next_power_of_2(M) <= 16 unrolled rows)
GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# W elements per thread of one [BLOCK_N, BLOCK_K] slab (held in registers as float32): 64 -> 64 registers.
ELEMS_PER_THREAD = 64
# The longest row the M = 1 kernel loads in one request (larger K: the K-loop kernel): with row_config's 4 outputs
# per program, K <= 4096 keeps the slab at <= 128 weight elements per thread (measured: K = 2048 and 3072).
MAX_ROW_K = 4096


class GemvConfig(NamedTuple):
    """Launch configuration: ``block_n`` output features per program, ``block_k`` columns of ``W`` per load
    (a power of two; ``>= K`` means one tile, no K loop), ``num_warps``."""

    block_n: int
    block_k: int
    num_warps: int


# The (rows per program, num_warps) pairs the rule chooses from; benchmarks/bench_gemv.py times all of them.
CONFIG_CHOICES: tuple[tuple[int, int], ...] = ((4, 4), (4, 8), (8, 4), (8, 8))


def block_k_for(block_n: int, num_warps: int, k: int) -> int:
    """The K chunk of a ``(block_n, num_warps)`` config: the whole row (``next_power_of_2(K)``) when that puts at
    most :data:`ELEMS_PER_THREAD` weight elements in each thread (one tile), else half that budget (the K loop
    keeps two tiles in flight: register double buffering)."""
    kp = triton.next_power_of_2(max(1, k))
    cap = ELEMS_PER_THREAD * 32 * num_warps // block_n
    return max(16, kp if kp <= cap else cap // 2)


def choose_config(m: int, n: int, k: int, block_n: int | None = None, num_warps: int | None = None) -> GemvConfig:
    """The launch configuration for ``M`` rows of ``x``, ``N`` outputs and a reduction of length ``K``.

    Rule (from the fused GEMV that measured fastest on the H200 at M = 1-2: 4 rows per program, the whole
    ``K = 1024`` row in one load, 4 warps):

    - ``num_warps`` = 4 for ``K <= 1024``, else 8 (more threads in flight for longer rows);
    - ``block_n`` = 4, or 8 when ``M >= 3`` and an 8-row slab of the whole row still fits
      :data:`ELEMS_PER_THREAD` (halves the L2 reads of ``x`` and the recomputed activations per weight byte);
    - ``block_k`` = :func:`block_k_for`.

    ``block_n`` / ``num_warps`` override the rule (benchmarks). Unmeasured for this kernel beyond that starting
    point: benchmarks/bench_gemv.py times every config of :data:`CONFIG_CHOICES` plus 1-2-warp programs (which
    won at M >= 3 for the fused norm GEMV of fusion_pass, K = 1024) so the rule can be corrected from data.

    Returns:
        a :class:`GemvConfig`.
    """
    kp = triton.next_power_of_2(max(1, k))
    warps = num_warps if num_warps is not None else (4 if kp <= 1024 else 8)
    if block_n is None:
        block_n = 8 if (m >= 3 and 8 * kp <= ELEMS_PER_THREAD * 32 * warps) else 4
    return GemvConfig(block_n, block_k_for(block_n, warps, k), warps)


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
# Timed by benchmarks/bench_gemv.py --skinny (H200, bf16, us per call, M = 2-32). o_proj (1024 x 2048), session 5
# (results/gemv-skinny-h200.json): (32, 256, 4) 3.9-4.2 at M = 2-16, (64, 256, 4) 4.7 at M = 32 (cuBLAS 12.6-13.0 at
# M = 2-4, 6.0 at M = 8-32); the session-6 fixup did not help it (within +-0.1 us or slower). down_proj with SwiGLU
# (1024 x 3072), session 6 (results/gemv-skinny-fixup-h200.json): (128, 256, 8, fixup) 5.24 / 5.24 / 5.35 / 5.89 at
# M = 2 / 4 / 8 / 16 and (64, 256, 4, fixup) 7.17 at M = 32, against 6.39-8.49 without the fixup and 10.9-11.4 for
# SiLU-and-mul then cuBLAS.
SKINNY_CHOICES: tuple[SkinnyConfig, ...] = (
    SkinnyConfig(16, 256, 2), SkinnyConfig(16, 256, 4), SkinnyConfig(16, 512, 4), SkinnyConfig(16, 512, 8),
    SkinnyConfig(16, 1024, 8), SkinnyConfig(32, 256, 4), SkinnyConfig(32, 512, 4), SkinnyConfig(32, 512, 8),
    SkinnyConfig(64, 256, 4),
    # the in-kernel split-K fixup instead of the reduction kernel (session 6)
    SkinnyConfig(32, 256, 4, True), SkinnyConfig(64, 256, 4, True), SkinnyConfig(64, 128, 4, True),
    SkinnyConfig(128, 256, 8, True), SkinnyConfig(128, 512, 8, True),
)


def parse_skinny_config(value: str | None) -> SkinnyConfig | None:
    """Parse ``NANOVLLM_SKINNY_CONFIG`` ("block_n,chunk_k,num_warps[,fixup]", e.g. "16,512,4" or "64,256,4,1";
    unset or empty -> None).

    Raises:
        ValueError: not three or four integers, block_n / chunk_k not powers of two >= 16, num_warps not 1, 2, 4
            or 8, or fixup not 0 or 1.
    """
    if value is None or not value.strip():
        return None
    try:
        vals = [int(v) for v in value.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4):
        raise ValueError(f"NANOVLLM_SKINNY_CONFIG must be 'block_n,chunk_k,num_warps[,fixup]', got {value!r}")
    bn, ks, warps = vals[:3]
    fixup = vals[3] if len(vals) == 4 else 0
    if bn < 16 or bn & (bn - 1) or ks < 16 or ks & (ks - 1) or warps not in (1, 2, 4, 8) or fixup not in (0, 1):
        raise ValueError(f"NANOVLLM_SKINNY_CONFIG: block_n and chunk_k must be powers of two >= 16, num_warps "
                         f"1, 2, 4 or 8 and fixup 0 or 1, got {value!r}")
    return SkinnyConfig(bn, ks, warps, bool(fixup))


SKINNY_OVERRIDE: SkinnyConfig | None = parse_skinny_config(os.environ.get("NANOVLLM_SKINNY_CONFIG"))


def skinny_config(m: int, n: int, k: int, act: str = "none") -> SkinnyConfig:
    """The skinny kernel's launch configuration for ``M`` rows, ``N`` outputs, reduction length ``K``: the fastest of
    the H200 sweeps (see :data:`SKINNY_CHOICES`). SwiGLU: wide tiles (fewer programs recompute the activation) with
    the in-kernel fixup: 128 W rows and 8 warps up to M = 16, 64 and 4 warps above. No activation: 32 W rows up to
    M = 16, 64 above, 4 warps, the reduction kernel. K in chunks of 256. ``NANOVLLM_SKINNY_CONFIG`` (read at import)
    overrides it."""
    if SKINNY_OVERRIDE is not None:
        return SKINNY_OVERRIDE
    if act == "silu_mul":
        return SkinnyConfig(128, 256, 8, True) if m <= 16 else SkinnyConfig(64, 256, 4, True)
    return SkinnyConfig(64, 256, 4) if m > 16 else SKINNY_DEFAULT


# ---------------------------------------------------------------------------------------------------- reference
def apply_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x)`` in PyTorch, in x's dtype: ``"none"`` returns ``x``; ``"silu_mul"`` maps ``[..., 2K]`` laid out as
    gate | up to ``F.silu(gate) * up`` ``[..., K]`` (the same ops as :class:`nanovllm.layers.activation.SiluAndMul`).

    Raises:
        ValueError: unknown ``act``, or an odd last dim for ``"silu_mul"``.
    """
    if act == "none":
        return x
    if act == "silu_mul":
        if x.shape[-1] % 2:
            raise ValueError(f"silu_mul needs an even last dim (gate | up), got {tuple(x.shape)}")
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "none"
             ) -> torch.Tensor:
    """Reference of :func:`gemv`: the activation and the product in float32 (float64 inputs stay float64).

    Args:
        x: ``[M, K]`` (``act="none"``) or ``[M, 2K]`` (``"silu_mul"``), any floating dtype.
        weight: ``[N, K]``; bias: ``[N]`` or None.
        act: ``"none"`` or ``"silu_mul"``.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: on inconsistent shapes or an unknown ``act``.
    """
    _check_shapes(x, weight, bias, act)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(apply_act(x.to(ct), act), weight.to(ct), None if bias is None else bias.to(ct))
    return y.to(x.dtype)


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> tuple[int, int, int]:
    """(M, N, K) after checking ``act``, the ranks and the matching sizes (ValueError otherwise)."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    want = 2 * k if act == "silu_mul" else k
    if x.shape[1] != want:
        raise ValueError(f"x must be [M, {want}] for weight {tuple(weight.shape)} and act={act!r}, "
                         f"got {tuple(x.shape)}")
    if k == 0:
        raise ValueError("K = 0 (empty reduction) is not supported")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return x.shape[0], n, k


# ---------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _load_x(x_ptr, off, rk, mask, K, ACT: tl.constexpr):
    """The raw ``[BLOCK_K]`` input chunk(s) of one row at element offset ``off`` (the row start plus the chunk's
    first column is ``off + rk``): (gate, up) for silu_mul, (x, x) otherwise; masked elements are 0."""
    first = tl.load(x_ptr + off + rk, mask=mask, other=0.0)
    if ACT == "silu_mul":
        second = tl.load(x_ptr + off + K + rk, mask=mask, other=0.0)
    else:
        second = first
    return first, second


@triton.jit
def _act(first, second, ACT: tl.constexpr):
    """act of a loaded chunk in float32: silu(gate) * up = gate * up / (1 + exp(-gate)) for silu_mul, else x.
    (exp(-gate) = inf for very negative gate gives -0: the limit, no NaN.)"""
    a = first.to(tl.float32)
    if ACT == "silu_mul":
        a = a / (1.0 + tl.exp(-a)) * second.to(tl.float32)
    return a


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """y[:M, pid*BLOCK_N : +BLOCK_N] = act(x) @ W^T (+ b). x: [M, K or 2K] (row stride stride_xm, columns
    contiguous); W: [N, K] contiguous; b: [N]; y: [M, N] (row stride stride_ym). M <= BLOCK_M; M >= 1."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rn64 = rn.to(tl.int64)
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ONE_TILE:
        rk = tl.arange(0, BLOCK_K)
        k_mask = rk < K
        # the weight slab first: it is the one long HBM read; everything below overlaps its latency
        w = tl.load(w_ptr + rn64[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        nxt0, nxt1 = _load_x(x_ptr, 0, rk, k_mask, K, ACT)  # row 0 (M >= 1)
        for m in tl.static_range(BLOCK_M):
            if m < M:
                cur0 = nxt0
                cur1 = nxt1
                if m + 1 < BLOCK_M:  # prefetch row m + 1 (masked off past M)
                    nxt0, nxt1 = _load_x(x_ptr, (m + 1) * stride_xm, rk, k_mask & (m + 1 < M), K, ACT)
                a = _act(cur0, cur1, ACT)
                y = tl.sum(w * a[None, :], axis=1) + bias
                tl.store(y_ptr + m * stride_ym + rn64, y.to(dt), mask=n_mask)
    else:
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [n, m]: a row's sums join as a column
        rk0 = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn64[:, None] * K + rk0[None, :]
        # register double buffering: the next W tile is requested before the current one is used (num_stages
        # does not pipeline loads that feed no tl.dot); past the last tile the request is fully masked (no traffic)
        w_next = tl.load(w_ptrs, mask=n_mask[:, None] & (rk0 < K)[None, :], other=0.0, eviction_policy="evict_first")
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_mask = rk < K
            w_cur = w_next
            w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=n_mask[:, None] & (rk + BLOCK_K < K)[None, :], other=0.0,
                             eviction_policy="evict_first")
            w = w_cur.to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                if m < M:
                    x0, x1 = _load_x(x_ptr, m * stride_xm, rk, k_mask, K, ACT)
                    part = tl.sum(w * _act(x0, x1, ACT)[None, :], axis=1)
                    acc = tl.where(rm[None, :] == m, acc + part[:, None], acc)
        y = acc + bias[:, None]
        tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn64[:, None], y.to(dt),
                 mask=n_mask[:, None] & (rm < M)[None, :])


@triton.jit
def _gemv_row_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BKP: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[0, pid*BLOCK_N : +BLOCK_N] = act(x[0]) @ W^T (+ b) for ONE row of x: the whole [BLOCK_N, K] slab of W in one
    load (BKP = next_power_of_2(K) columns, K a compile-time constant), then one tl.sum over K per output."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BKP)
    k_mask = rk < K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                eviction_policy="evict_first")
    if USE_PDL:  # the weights are read before the previous kernel ends; x after (kernels/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    first, second = _load_x(x_ptr, 0, rk, k_mask, K, ACT)
    y = tl.sum(w.to(tl.float32) * _act(first, second, ACT)[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


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
    the counter (Stream-K's "fixup", arXiv 2301.03598; see ``fusion_pass.kernels._fused_skinny_kernel``).
    USE_PDL: the weight chunk is loaded before waiting for the previous kernel (kernels/pdl.py).
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


def row_config(k: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of :func:`_gemv_row_kernel` (M = 1): 4 warps; 1 output per program up to K = 2048, else
    4 (the fastest of the H200 sweep for o_proj K = 2048 and down_proj K = 3072). The slab then holds at most
    4 * 4096 / 128 = 128 elements per thread."""
    return (1 if k <= 2048 else 4), 4


# ---------------------------------------------------------------------------------------------------- launcher
@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, K, stride_xm, BLOCK: tl.constexpr):
    """y[row, cols] = silu(gate) * up for one ``BLOCK`` of columns of one row (x = [gate | up])."""
    row = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rk < K
    first, second = _load_x(x_ptr, row * stride_xm, rk, mask, K, "silu_mul")
    tl.store(y_ptr + row * K + rk, _act(first, second, "silu_mul").to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` in one pass (float32 math, one rounding to ``x.dtype``), for the op's large-M
    path on the GPU: the PyTorch ops would take two kernels and an intermediate ``[M, K]`` tensor.

    Args:
        x: ``[M, 2K]`` laid out as gate | up, columns contiguous, fp16/bf16/fp32.

    Returns:
        ``[M, K]`` contiguous, in ``x.dtype``.

    Raises:
        ValueError: not 2-D, an odd last dim, or non-contiguous columns.
    """
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_mul needs a [M, 2K] input with contiguous columns, got {tuple(x.shape)}")
    m, k = x.shape[0], x.shape[1] // 2
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m and k:
        block = 1024
        _silu_mul_kernel[(m, triton.cdiv(k, block))](x, y, k, x.stride(0), BLOCK=block, num_warps=4)
    return y


def _check_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
                  out: torch.Tensor | None, max_m: int, too_many: str) -> tuple[int, int, int, torch.Tensor]:
    """The launchers' shared checks: shapes (:func:`_check_shapes`), one supported dtype, at most ``max_m`` rows
    (``too_many`` starts the message), contiguous weight and bias, contiguous columns of x, and ``out`` (allocated
    when None). Returns (M, N, K, out). Raises ValueError."""
    m, n, k = _check_shapes(x, weight, bias, act)
    if x.dtype not in GEMV_DTYPES:
        raise ValueError(f"dtype must be one of {GEMV_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if m > max_m:
        raise ValueError(f"{too_many}={max_m} rows, got M={m}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous ([N, K] row-major)")
    if x.stride(1) != 1 and m > 0:
        raise ValueError(f"x must have contiguous columns, got strides {x.stride()}")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return m, n, k, out


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Triton version of :func:`gemv` (same contract), one kernel launch, no host synchronization and no
    allocation besides the output (CUDA-graph capturable).

    Args:
        x, weight, bias, act: as :func:`gemv`; additionally ``x.stride(1) == 1`` and ``weight`` contiguous.
        out: optional ``[M, N]`` contiguous tensor of ``x.dtype`` to write into (tests pre-fill it with NaN).
        config: override :func:`choose_config` (benchmarks, tests of the K loop); without it, ``M = 1`` with
            ``K <= MAX_ROW_K`` runs ``_gemv_row_kernel`` (:func:`row_config`).

    Raises:
        ValueError: see :func:`gemv`; also a non-contiguous weight, ``x.stride(1) != 1`` or a bad ``out``.
    """
    m, n, k, out = _check_launch(x, weight, bias, act, out, MAX_M, "the GEMV takes at most MAX_M")
    if m == 0 or n == 0:
        return out
    if m == 1 and config is None and k <= MAX_ROW_K:
        bn, warps = row_config(k)
        pdl = use_pdl(x)
        _gemv_row_kernel[(triton.cdiv(n, bn),)](x, weight, bias if bias is not None else weight, out, n, K=k, ACT=act,
                                                HAS_BIAS=bias is not None, BLOCK_N=bn,
                                                BKP=triton.next_power_of_2(k), USE_PDL=pdl, num_warps=warps,
                                                num_stages=1, **launch_options(pdl))
        return out
    cfg = config if config is not None else choose_config(m, n, k)
    if cfg.block_k & (cfg.block_k - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"block_n and block_k must be powers of two, got {cfg}")
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        ACT=act,
        HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        ONE_TILE=cfg.block_k >= k,
        num_warps=cfg.num_warps,
        num_stages=1,
    )
    return out


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
    m, n, k, out = _check_launch(x, weight, bias, act, out, SKINNY_MAX_M,
                                 "the skinny kernel takes at most SKINNY_MAX_M")
    if m == 0 or n == 0:
        return out
    chunk = min(cfg.chunk_k, max(16, triton.next_power_of_2(k)))
    bm = max(16, triton.next_power_of_2(m))
    if (cfg.block_n + bm) * chunk * x.element_size() > SKINNY_MAX_SMEM:
        raise ValueError(f"the skinny kernel's [{cfg.block_n}, {chunk}] W chunk and [{chunk}, {bm}] activation tile "
                         f"exceed {SKINNY_MAX_SMEM} bytes of shared memory; lower block_n or chunk_k")
    splits = triton.cdiv(k, chunk)
    tiles = triton.cdiv(n, cfg.block_n)
    counters = None
    if cfg.fixup and splits > 1:
        from fusion_pass.kernels import fixup_counters  # one counter buffer per device for both skinny kernels

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
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](part, b, out, m, n, out.stride(0), S=splits,
                                                            HAS_BIAS=bias is not None, BLOCK=block, USE_PDL=pdl,
                                                            num_warps=4, **launch_options(pdl))
    return out


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    force_triton: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = act(x) @ weight^T (+ bias)`` for a few rows of ``x``.

    Args:
        x: ``[M, K]`` for ``act="none"``, ``[M, 2K]`` laid out as gate | up for ``act="silu_mul"``;
            fp16/bf16/fp32 on the Triton path, ``M <= MAX_M`` (16) there.
        weight: ``[N, K]`` (nn.Linear layout), same dtype as ``x``.
        bias: ``[N]`` same dtype, or None.
        act: ``"none"`` or ``"silu_mul"`` (``act(x)_k = silu(x_k) * x_{K+k}``, float32 in the kernel).
        force_triton: run the Triton kernel on CPU tensors (``TRITON_INTERPRET=1`` tests).
        out: optional ``[M, N]`` output buffer (contiguous, ``x.dtype``).

    Returns:
        ``[M, N]`` in ``x.dtype``. The Triton path accumulates in float32 and rounds once; the reference path
        (CPU) is :func:`gemv_ref`.

    Raises:
        ValueError: on inconsistent shapes, unsupported or mixed dtypes, ``M > MAX_M`` (Triton path), or an
            unknown ``act``.
    """
    if x.is_cuda or force_triton:
        return gemv_triton(x, weight, bias, act, out=out)
    y = gemv_ref(x, weight, bias, act)
    return y if out is None else out.copy_(y)
