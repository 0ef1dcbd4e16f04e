"""The "stream" fused variant: decode-shaped (M = 1-2 rows) add + RMSNorm + GEMV on the CUDA cores.

Each program owns BN whole rows of W (one [BN, next_pow2(K)] load) and loops over the tiles with a persistent grid
(c programs per SM), the next tile's W requested before the current one is reduced (register double buffering).
No tl.dot: at one or two rows the tensor cores would idle on padding; the weight stream is the whole cost.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import cdiv, launch_options, next_power_of_2, sm_count, use_pdl
from ..launch_cache import LaunchCache
from .common import m_bucket
from .segments import pick_segment, segment_args

# The most rows one launch takes with an explicit config (BM = next_power_of_2(M) rows, unrolled).
STREAM_MAX_ROWS = 16
# (BN, num_warps, programs per SM; 0 = one program per tile) per M bucket: the candidates the dispatcher measures.
STREAM_CONFIGS: dict[int, list[tuple[int, int, int]]] = {
    1: [(4, 4, 4), (2, 2, 8), (4, 2, 8)],
    2: [(4, 4, 4), (2, 2, 8), (4, 2, 8)],
}


def stream_configs(m: int) -> list[tuple[int, int, int]]:
    """Stream configs (BN, num_warps, programs per SM or 0) for M rows; empty unless M <= 2."""
    return list(STREAM_CONFIGS.get(m_bucket(m), []))


@triton.jit(do_not_specialize=["N1", "N2"])
def _fused_stream_kernel(x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, eps,
                         K: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BKP: tl.constexpr, USE_PDL: tl.constexpr = False,
                         G: tl.constexpr = 1, w1_ptr=None, w2_ptr=None, b1_ptr=None, b2_ptr=None, y1_ptr=None,
                         y2_ptr=None, N1=0, N2=0):
    """Fused GEMV with whole-row W tiles and a persistent grid, for M <= BM (a few) rows.

    Program p handles the tiles t = p, p + P, p + 2P, ... (P programs; tile t = W rows [t*BN, t*BN + BN)). Each
    tile is ONE [BN, BKP] load of whole W rows (BKP = next_power_of_2(K), K a compile-time constant), issued for
    tile t + P before tile t is reduced (register double buffering; past the last tile the load is fully
    masked). Per row m: h = x (+ r) [BKP] (L1/L2-resident), sum of squares, y = sum_k W_nk (h_k g_k) * 1/rms(h)
    (FlashNorm epilogue) + b. Program 0 writes h = x + r on its first tile. x, r, h: [M, K] row-major; g: [K];
    W: [N, K] row-major; b: [N]; y: [M, N]. fp32 accumulation.
    USE_PDL (programmatic dependent launch, see `use_pdl`): the first W tile and g are loaded before
    waiting for the previous kernel in the stream; x, r, h and y are touched only after the wait.
    G > 1 (a weight group, see segments.py): (w, b, y, N) is segment 0 and (w1, b1, y1, N1), (w2, b2, y2, N2) the
    others; the tiles are numbered across the segments (cdiv(N_i, BN) each) and every tile reads and writes its own
    segment's tensors.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    T0 = tl.cdiv(N, BN)
    T1 = tl.cdiv(N1, BN)
    num_tiles = T0 + T1 + tl.cdiv(N2, BN)  # N1 = N2 = 0 unless G > 1
    rk = tl.arange(0, BKP)
    k_mask = rk < K
    rn0 = tl.arange(0, BN)
    dt = y_ptr.dtype.element_ty
    tt, n_seg, w_seg, b_seg, y_seg, _ = pick_segment(pid, T0, T1, N, N1, N2, w_ptr, w1_ptr, w2_ptr, b_ptr, b1_ptr,
                                                     b2_ptr, y_ptr, y1_ptr, y2_ptr, G)
    rn = tt * BN + rn0
    w = tl.load(w_seg + rn.to(tl.int64)[:, None] * K + rk[None, :], mask=(rn < n_seg)[:, None] & k_mask[None, :],
                other=0.0, eviction_policy="evict_first")
    g = tl.load(g_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for t in range(pid, num_tiles, nprog):
        tt, n_seg, w_seg, b_seg, y_seg, _ = pick_segment(t, T0, T1, N, N1, N2, w_ptr, w1_ptr, w2_ptr, b_ptr, b1_ptr,
                                                         b2_ptr, y_ptr, y1_ptr, y2_ptr, G)
        rn = tt * BN + rn0
        n_mask = rn < n_seg
        tn, n_next, w_next_seg, _b, _y, _c = pick_segment(t + nprog, T0, T1, N, N1, N2, w_ptr, w1_ptr, w2_ptr, b_ptr,
                                                          b1_ptr, b2_ptr, y_ptr, y1_ptr, y2_ptr, G)
        rn_next = tn * BN + rn0
        w_next = tl.load(w_next_seg + rn_next.to(tl.int64)[:, None] * K + rk[None, :],
                         mask=(rn_next < n_next)[:, None] & k_mask[None, :], other=0.0,
                         eviction_policy="evict_first")
        wf = w.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_seg + rn, mask=n_mask, other=0.0).to(tl.float32)
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
                tl.store(y_seg + m * n_seg + rn, y.to(dt), mask=n_mask)
        w = w_next


def stream_grid(widths: Sequence[int], bn: int, per_sm: int, device: torch.device) -> int:
    """Programs of one stream launch over segments of ``widths`` rows in tiles of ``bn``: one per tile, or with
    ``per_sm`` > 0 a persistent grid of at most ``per_sm`` programs per SM (CUDA; the interpreter takes one per
    tile)."""
    tiles = sum(cdiv(n, bn) for n in widths)
    return tiles if per_sm <= 0 or device.type != "cuda" else min(tiles, per_sm * sm_count(device))


def launch_stream(x2d: Tensor, residual2d: Optional[Tensor], norm_weight: Tensor, weights: Sequence[Tensor],
                  biases: Sequence[Optional[Tensor]], ys: Sequence[Tensor], h_out: Optional[Tensor], eps: float,
                  config: tuple[int, ...]) -> None:
    """Write every y_i [M, N_i] (and h_out = x + r when both are given) with ONE stream launch over a group of 1 to
    MAX_GROUP weights (segments.py); shapes as :func:`fusion_pass.kernels.fused_linears`. config: (BN, num_warps,
    programs per SM or 0).

    Raises:
        ValueError: M > STREAM_MAX_ROWS, or a group the kernel cannot take (segments.segment_args).
    """
    M, K = x2d.shape
    bn, warps, per_sm = config
    bm = m_bucket(M)
    if bm > STREAM_MAX_ROWS:
        raise ValueError(f"stream variant handles at most {STREAM_MAX_ROWS} rows, got M={M}")
    ws, bs, outs, ns = segment_args(weights, biases, ys)
    pdl = use_pdl(x2d)
    grid = stream_grid(ns, bn, per_sm, x2d.device)
    has_res = residual2d is not None
    write_h = has_res and h_out is not None
    has_bias = biases[0] is not None
    g = len(weights)
    # every parameter of the kernel, in signature order (LaunchCache's contract); the group's segments 1 and 2, or
    # the defaults of an ungrouped launch
    rest = (ws[1], ws[2], bs[1], bs[2], outs[1], outs[2]) if g > 1 else (None,) * 6
    args = (x2d, residual2d if has_res else x2d, norm_weight, ws[0], bs[0], outs[0], h_out if write_h else outs[0],
            M, ns[0], float(eps), K, has_res, has_bias, write_h, bm, bn, next_power_of_2(K), pdl, g, *rest,
            ns[1], ns[2])
    key = (M, K, tuple(ns), config, has_res, has_bias, write_h, pdl, x2d.dtype, ws[0].dtype,
           norm_weight.dtype, residual2d.dtype if has_res else None, bs[0].dtype if has_bias else None,
           h_out.dtype if write_h else None)
    _STREAM_LAUNCHES.launch(key, (grid,), args, dict(num_warps=warps, num_stages=1, **launch_options(pdl)))


_STREAM_LAUNCHES = LaunchCache(_fused_stream_kernel)
