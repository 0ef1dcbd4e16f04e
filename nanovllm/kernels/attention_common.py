"""Pieces shared by the prefill and decode attention kernels over the paged KV cache.

- :func:`online_softmax_tile`: one ``BLOCK_N``-key step of the online softmax (``@triton.jit``, inlined into
  ``_prefill_kernel`` and ``_decode_split_kernel``).
- :func:`check_paged_attention_args` and :func:`check_out`: host-side argument checks of the Triton launchers.

The online softmax follows FlashAttention (Dao, Fu, Ermon, Rudra, Re, 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", Alg. 1) with exponentials in base 2:
``exp(s * x) = exp2(x * s * log2(e))``, so the launchers pass ``qk_scale = scale * LOG2E``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): softmax scale -> base-2 exponent scale


@triton.jit
def online_softmax_tile(
    acc,
    m_i,
    l_i,
    q,
    start_n,
    q_pos,
    kv_end,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    kv_head_off,
    stride_kb,
    stride_kt,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of ``ROWS`` query rows over key positions ``[start_n, start_n + BLOCK_N)``.

    Key position ``n`` is read from ``cache[bt_row[n // BLOCK_SIZE], n % BLOCK_SIZE, kv_head]``; when
    ``BLOCK_N <= BLOCK_SIZE`` (``start_n`` a multiple of ``BLOCK_N``, ``BLOCK_SIZE`` a multiple of ``BLOCK_N``)
    the tile lies in one block and one scalar block id is loaded.

    Args:
        acc: float32 ``[ROWS, HEAD_DIM]`` unnormalized output so far.
        m_i: float32 ``[ROWS]`` running max of the scores (log2 domain; start finite, e.g. -1e30, so a fully
            masked tile never computes ``inf - inf``).
        l_i: float32 ``[ROWS]`` running sum of ``exp2(score - m_i)``.
        q: ``[ROWS, HEAD_DIM]`` query tile in the cache dtype.
        start_n: first key position of the tile.
        q_pos: int ``[ROWS]`` absolute position of each query row (read only when ``MASKED and CAUSAL``).
        kv_end: keys at positions ``>= kv_end`` are masked (read only when ``MASKED``).
        k_cache_ptr, v_cache_ptr: cache base pointers; bt_row_ptr: this sequence's block-table row (int32).
        kv_head_off: int64 element offset of the kv head (``kv_head * stride_kh``).
        stride_kb, stride_kt: cache strides (elements) of a block and of a token.
        qk_scale: ``softmax scale * LOG2E``.
        MASKED: False for tiles known to be fully visible (no bounds or causal checks, unmasked loads).
        CAUSAL: with MASKED, key ``n`` is visible to row ``r`` only if ``n <= q_pos[r]`` (and ``n < kv_end``).
        DOT_PRECISION: ``input_precision`` of both ``tl.dot`` calls ("ieee" for fp32 inputs).

    Returns:
        The updated ``(acc, m_i, l_i)``.
    """
    n = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    in_kv = n < kv_end
    if BLOCK_N <= BLOCK_SIZE:
        blk = tl.load(bt_row_ptr + start_n // BLOCK_SIZE).to(tl.int64)
    else:
        if MASKED:
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=in_kv, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row_ptr + n // BLOCK_SIZE).to(tl.int64)
    row_off = blk * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_kt
    offs = row_off[:, None] + kv_head_off + d[None, :]
    if MASKED:
        k = tl.load(k_cache_ptr + offs, mask=in_kv[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=in_kv[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offs)
        v = tl.load(v_cache_ptr + offs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [ROWS, BLOCK_N], log2 domain
    if MASKED:
        if CAUSAL:
            visible = (n[None, :] <= q_pos[:, None]) & in_kv[None, :]
        else:
            visible = in_kv[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Return ``out`` (validated: same shape/dtype/device as ``q``, contiguous last dim) or a new ``empty_like(q)``.

    Raises:
        ValueError: if ``out`` does not match ``q``.
    """
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}), got {tuple(out.shape)}, {out.dtype}")
    return out


def check_paged_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Checks common to the prefill and decode Triton launchers (block-table checks are left to each).

    Args:
        q: ``[N, H, D]`` (prefill) or ``[B, H, D]`` (decode), last dim contiguous, ``D`` a power of two >= 16.
        k_cache, v_cache: equal ``[num_blocks, block_size, Hkv, D]``, contiguous, ``block_size`` a power of two,
            ``H % Hkv == 0``.

    Raises:
        ValueError: on the first violated condition, in the order listed above (shapes, contiguity, head_dim
            match, GQA ratio, head_dim, block_size, q's last-dim stride).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k_cache={tuple(k_cache.shape)} v_cache={tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim mismatch: q {head_dim}, cache {k_cache.shape[3]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.stride(-1) != 1:
        raise ValueError("q must have a contiguous last dim")
