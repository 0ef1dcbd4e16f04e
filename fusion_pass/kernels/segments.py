"""Weight groups: the linears of one site launched as ONE fused kernel over their stacked rows.

A norm often feeds several linears (transformers' Llama: q_proj, k_proj, v_proj; gate_proj, up_proj). Launched one
by one, each fused kernel recomputes the row norm and pays its own launch and tail; small weights (k, v) also run
far from the bandwidth floor. Grouped, the weights W_0 .. W_{G-1} ([N_i, K] each, separate tensors) act as the
segments of one virtual [N_0 + ... + N_{G-1}, K] matrix: the kernel's n-tiles are numbered across the segments
(segment i owns T_i = cdiv(N_i, tile) consecutive tiles, so no tile straddles two), and each program picks its
segment's weight, bias and output pointers from its tile number with two scalar comparisons (:func:`pick_segment`).
Nothing is copied or concatenated; every output y_i stays its own [M, N_i] tensor.

:func:`split_groups` decides which weights of a site share a launch (the dispatcher and the backend's pretune use
it too, so they measure the shape that runs: M x (N_0 + .. + N_{G-1}) x K).
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor


MAX_GROUP = 3  # weights per launch (q, k, v); longer lists are split into consecutive groups


@triton.jit
def pick_segment(t, T0, T1, N0, N1, N2, w0, w1, w2, b0, b1, b2, y0, y1, y2, G: tl.constexpr):
    """The segment of global tile t: (tile index within it, its N, its W, bias and y pointers, its first column
    in the stacked [M, N_0 + N_1 + N_2] numbering).

    Segment 0 owns tiles [0, T0), segment 1 [T0, T0 + T1), segment 2 the rest (G = 1 to 3 segments; pointers and
    counts of absent segments are ignored); the caller derives T0, T1 from N0, N1 and its tile size. A tile past
    the last one maps to the last segment beyond its N, so a load masked with ``rows < N`` reads nothing.
    """
    tt = t
    n = t * 0 + N0
    c = t * 0
    w = w0
    b = b0
    y = y0
    if G > 1:  # selects, not branches: straight-line code keeps the kernels' register allocation unchanged
        s1 = t >= T0
        tt = tl.where(s1, t - T0, tt)
        n = tl.where(s1, N1, n)
        c = tl.where(s1, N0, c)
        w = tl.where(s1, w1, w)
        b = tl.where(s1, b1, b)
        y = tl.where(s1, y1, y)
    if G > 2:
        s2 = t >= T0 + T1
        tt = tl.where(s2, t - T0 - T1, tt)
        n = tl.where(s2, N2, n)
        c = tl.where(s2, N0 + N1, c)
        w = tl.where(s2, w2, w)
        b = tl.where(s2, b2, b)
        y = tl.where(s2, y2, y)
    return tt, n, w, b, y, c


def split_groups(widths: Sequence[int], kinds: Sequence[Hashable]) -> list[list[int]]:
    """Indices of the weights that share one launch: consecutive runs of at most :data:`MAX_GROUP` weights of one
    kind (a run breaks where the kind changes).

    Args:
        widths: N_i of each weight (rows of W_i). kinds: one value per linear that must be equal within a group:
            whether it has a bias (the backend), or (has a bias, weight dtype, bias dtype) (the op at run time).
    Raises:
        ValueError: the two lists differ in length.
    """
    if len(widths) != len(kinds):
        raise ValueError(f"split_groups: {len(widths)} widths but {len(kinds)} bias flags / kinds")
    groups: list[list[int]] = []
    for i, kind in enumerate(kinds):
        if groups and len(groups[-1]) < MAX_GROUP and kinds[groups[-1][0]] == kind:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def segment_args(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                 ys: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[int]]:
    """The kernel arguments of a group of 1 to :data:`MAX_GROUP` weights: (the 3 W pointers, the 3 bias pointers,
    the 3 y pointers, N_0..N_2). Absent segments repeat segment 0's tensors with N = 0; an absent bias is W (never
    read: HAS_BIAS is False then). The kernels derive each segment's tiles from its N.

    Raises:
        ValueError: an empty group or more than MAX_GROUP weights, lists of different lengths, or weights and
            biases of several dtypes (the kernel picks among their pointers, which must have one type).
    """
    g = len(weights)
    if not 1 <= g <= MAX_GROUP or len(biases) != g or len(ys) != g:
        raise ValueError(f"a weight group holds 1 to {MAX_GROUP} weights with one bias and one output each, got "
                         f"{g} weights, {len(biases)} biases, {len(ys)} outputs")
    if g > 1 and len({w.dtype for w in weights} | {b.dtype for b in biases if b is not None}) > 1:
        raise ValueError("a weight group's weights and biases must share one dtype, got "
                         f"{sorted({str(w.dtype) for w in weights} | {str(b.dtype) for b in biases if b is not None})}")
    pad = MAX_GROUP - g
    ws = list(weights) + [weights[0]] * pad
    bs = [b if b is not None else w for b, w in zip(biases, weights)] + [ws[0]] * pad
    outs = list(ys) + [ys[0]] * pad
    ns = [int(w.shape[0]) for w in weights] + [0] * pad
    return ws, bs, outs, ns
