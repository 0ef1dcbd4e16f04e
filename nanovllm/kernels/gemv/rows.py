"""The CUDA-core GEMV of the engine's small-M linear: ``y[M, N] = act(x)[M, K] @ W[N, K]^T (+ b)`` for M <= 16.

Why a GEMV: at decode (``M`` = 1-4) these products only stream the weight once, and cuBLAS's kernel choice for
``N = 1024`` outputs (Qwen3-0.6B's o_proj and down_proj) leaves much of the bandwidth unused (docs/performance.md).
The kernel here is built for the bandwidth:

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
one row of ``x``, with 4 warps and 1 (K <= 2048) or 4 (longer rows) outputs per program (:func:`row_config`).

``act`` is recomputed by every program (each reads the whole ``x`` row anyway): that costs ``M * K * N /
BLOCK_N`` sigmoids, hidden under the weight stream at small ``M`` but not at ``M = 16``; hence ``BLOCK_N = 8``
for ``M >= 3`` where the slab still fits in registers (see :func:`choose_config`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusion_pass.launch import cdiv, launch_options, next_power_of_2, use_pdl

from .common import _act, _load_x, check_launch

MAX_M = 16  # the most rows one launch takes (BLOCK_M = next_power_of_2(M) <= 16 unrolled rows)
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


# The (rows per program, num_warps) pairs the rule chooses from; the kernel benchmark times all of them.
CONFIG_CHOICES: tuple[tuple[int, int], ...] = ((4, 4), (4, 8), (8, 4), (8, 8))


def block_k_for(block_n: int, num_warps: int, k: int) -> int:
    """The K chunk of a ``(block_n, num_warps)`` config: the whole row (``next_power_of_2(K)``) when that puts at
    most :data:`ELEMS_PER_THREAD` weight elements in each thread (one tile), else half that budget (the K loop
    keeps two tiles in flight: register double buffering)."""
    kp = next_power_of_2(max(1, k))
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

    ``block_n`` / ``num_warps`` override the rule (benchmarks time every config of :data:`CONFIG_CHOICES`).

    Returns:
        a :class:`GemvConfig`.
    """
    kp = next_power_of_2(max(1, k))
    warps = num_warps if num_warps is not None else (4 if kp <= 1024 else 8)
    if block_n is None:
        block_n = 8 if (m >= 3 and 8 * kp <= ELEMS_PER_THREAD * 32 * warps) else 4
    return GemvConfig(block_n, block_k_for(block_n, warps, k), warps)



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
    if USE_PDL:  # the weights are read before the previous kernel ends; x after (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    first, second = _load_x(x_ptr, 0, rk, k_mask, K, ACT)
    y = tl.sum(w.to(tl.float32) * _act(first, second, ACT)[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def row_config(k: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of :func:`_gemv_row_kernel` (M = 1): 4 warps; 1 output per program up to K = 2048, else
    4 (the fastest of the H200 sweep for o_proj K = 2048 and down_proj K = 3072). The slab then holds at most
    4 * 4096 / 128 = 128 elements per thread."""
    return (1 if k <= 2048 else 4), 4



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
    m, n, k, out = check_launch(x, weight, bias, act, out, MAX_M, "the GEMV takes at most MAX_M")
    if m == 0 or n == 0:
        return out
    if m == 1 and config is None and k <= MAX_ROW_K:
        bn, warps = row_config(k)
        pdl = use_pdl(x)
        _gemv_row_kernel[(cdiv(n, bn),)](x, weight, bias if bias is not None else weight, out, n, K=k, ACT=act,
                                                HAS_BIAS=bias is not None, BLOCK_N=bn,
                                                BKP=next_power_of_2(k), USE_PDL=pdl, num_warps=warps,
                                                num_stages=1, **launch_options(pdl))
        return out
    cfg = config if config is not None else choose_config(m, n, k)
    if cfg.block_k & (cfg.block_k - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"block_n and block_k must be powers of two, got {cfg}")
    _gemv_kernel[(cdiv(n, cfg.block_n),)](
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
        BLOCK_M=next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        ONE_TILE=cfg.block_k >= k,
        num_warps=cfg.num_warps,
        num_stages=1,
    )
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
