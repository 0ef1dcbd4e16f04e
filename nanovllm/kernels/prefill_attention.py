"""Variable-length causal prefill attention over the paged KV cache (Triton kernel + dispatch).

Algorithm: FlashAttention-style tiling with an online softmax (Dao et al., 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", Alg. 1), float32 accumulation, ``tl.dot`` for ``Q K^T`` and
``P V``, exponentials in base 2 (``exp(x) = exp2(x * log2(e))``).

Grid: ``(cdiv(max_seqlen_q, BLOCK_M), B, Hkv)``. One program owns ``BLOCK_M`` consecutive new tokens of one
sequence and *all* ``G = H // Hkv`` query heads that share one kv head, so each K/V tile loaded from the cache
is reused by ``G`` heads. The ``BLOCK_M x G`` (token, head) pairs are flattened into the ``M`` rows of the
``tl.dot`` (row ``r`` = token ``r // GP``, head ``r % GP``; ``GP`` = G rounded up to a power of two, padding rows
are masked).

Keys are walked in tiles of ``BLOCK_N`` positions. Position ``n`` of sequence ``b`` lives at
``cache[block_tables[b, n // block_size], n % block_size]``; when ``BLOCK_N <= block_size`` a whole tile lies in
one block and one scalar block id is loaded per tile. Tiles strictly below the causal diagonal of the query tile
run without masks; only the last few tiles (which cross the diagonal or the end of the context) are masked.
Only block-table entries of positions ``< ctx_len`` are read, so -1 padding is never dereferenced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import cdiv, next_power_of_2
from .attention_common import LOG2E, check_out, check_paged_attention_args, online_softmax_tile
from .reference import prefill_attention_ref


# stride_bt (the block-table width of an eager prefill step) takes every value from 1 up: unspecialized, so a first
# long prompt (a width that is a multiple of 16) does not compile a second variant of the kernel mid-run.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    o_ptr,
    cu_q_ptr,
    cu_k_ptr,
    bt_ptr,
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    qk_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq)
    ctx_len = tl.load(cu_k_ptr + seq + 1) - k_start
    prefix = ctx_len - q_len  # absolute position of new token 0

    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    r = tl.arange(0, ROWS)
    tok = m_start + r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    q_pos = prefix + tok

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)  # finite: fully-masked tiles must not produce inf - inf
    l_i = tl.zeros([ROWS], dtype=tl.float32)

    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    # Keys < prefix + m_start are visible to every row of this tile; keys >= hi to none.
    hi = tl.minimum(ctx_len, prefix + m_start + BLOCK_M)
    full_end = ((prefix + m_start) // BLOCK_N) * BLOCK_N
    # Tiles below full_end unmasked (MASKED=False), the rest causal-masked (MASKED=True, CAUSAL=True).
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, start_n, q_pos, ctx_len, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            stride_kb, stride_kt, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, False, True, DOT_PRECISION,
        )
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, start_n, q_pos, ctx_len, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            stride_kb, stride_kt, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, True, DOT_PRECISION,
        )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _prefill_config(group_pad: int, max_seqlen_q: int) -> tuple[int, int, int, int]:
    """Pick ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for the prefill kernel.

    The dot's M dimension (``BLOCK_M * GROUP_PAD`` rows) targets 128, shrinks for short query runs (less padding
    work when ``max_seqlen_q`` is small) but never goes below 16 (the ``tl.dot`` minimum).
    """
    block_m = max(1, 128 // group_pad)
    block_m = min(block_m, next_power_of_2(max(1, max_seqlen_q)))
    while block_m * group_pad < 16:
        block_m *= 2
    rows = block_m * group_pad
    return block_m, 64, 8 if rows >= 128 else 4, 2


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`prefill_attention` (same contract); ``block_m/block_n`` override the tiling."""
    _check_prefill_shapes(q, k_cache, v_cache, block_tables)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    out = check_out(out, q)
    batch = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_seqlen_q == 0:
        return out
    bm, bn, num_warps, num_stages = _prefill_config(group_pad, max_seqlen_q)
    if q.element_size() == 4 and head_dim >= 128:
        bn = 32  # fp32 tiles: keep shared memory (q + 2 stages of K/V) well under the 227 KB of an H100/H200
    bm = block_m or bm
    bn = block_n or bn
    if bm * group_pad < 16 or bn < 16:
        raise ValueError(f"tile too small for tl.dot: BLOCK_M*GROUP_PAD={bm * group_pad}, BLOCK_N={bn}")
    grid = (cdiv(max_seqlen_q, bm), batch, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        block_tables,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        float(scale) * LOG2E,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _check_prefill_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Validate the prefill launcher's arguments (see :func:`prefill_attention`); raises ValueError."""
    check_paged_attention_args(q, k_cache, v_cache)
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be int32 with a contiguous last dim")


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    force_triton: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal variable-length (prefill / chunked-prefill / cached-prefix) attention over the paged KV cache.

    Sequence ``b`` contributes ``q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` packed new tokens with context
    length ``ctx_len_b = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` (``q_len_b <= ctx_len_b``); new token ``i`` sits at
    absolute position ``ctx_len_b - q_len_b + i`` and attends to every context position ``<=`` it. The new tokens'
    K/V must already be in the cache (:func:`store_kvcache`); all K/V is read through ``block_tables[b]``.

    Args:
        q: ``[N, H, D]`` fp16/bf16/fp32, last dim contiguous; ``D`` a power of two >= 16.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous, ``H % Hkv == 0``; block_size a power of 2.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` prefix sums (tokens).
        block_tables: int32 ``[B, W]``, rows padded with -1 (never dereferenced).
        max_seqlen_q, max_seqlen_k: host ints, max new-token count / context length in the batch.
        scale: softmax scale (usually ``D ** -0.5``).
        force_triton: run the Triton kernel on CPU tensors (``TRITON_INTERPRET=1`` tests).
        out: optional preallocated ``[N, H, D]`` output (``q``'s dtype/device); written and returned.

    Returns:
        ``o``: ``[N, H, D]`` in ``q.dtype``.

    Raises:
        ValueError: on inconsistent shapes/dtypes.
    """
    if q.is_cuda or force_triton:
        return prefill_attention_triton(
            q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, max_seqlen_q, max_seqlen_k, scale, out=out
        )
    o = prefill_attention_ref(
        q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, max_seqlen_q, max_seqlen_k, scale
    )
    if out is None:
        return o
    return check_out(out, q).copy_(o)


def warm_up_lengths(group_pad: int) -> list[int]:
    """One ``max_seqlen_q`` per launch configuration that :func:`_prefill_config` can return for ``group_pad``
    (the smallest such length), ascending. The configuration depends on ``max_seqlen_q`` only up to
    ``128 // group_pad`` (where BLOCK_M stops growing), so powers of two up to 128 cover every one."""
    first: dict[tuple[int, int, int, int], int] = {}
    length = 1
    while length <= 128:
        first.setdefault(_prefill_config(group_pad, length), length)
        length *= 2
    return sorted(first.values())


def warm_up_prefill_attention(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, dtype: torch.dtype,
                              force_triton: bool = False) -> list[int]:
    """Compile the prefill kernel for every launch configuration a step on these caches can use, before a first
    request would: one launch of one sequence per length of :func:`warm_up_lengths`, reading block 0 of the
    caches (nothing is written to them; the outputs are dropped).

    Triton compiles a kernel once per configuration (BLOCK_M and the warp count follow ``max_seqlen_q``) and per
    specialization of its integer arguments; the caches fix the strides, and a step's query strides are multiples
    of 16 like these. Without this, a run whose longest new-token count falls in a range not seen before (prefix
    cache hits shorten it) compiled mid-run, about a second with the GPU idle.

    Args:
        k_cache, v_cache: one layer's ``[num_blocks, block_size, Hkv, D]`` caches (as the engine allocated them).
        num_heads: query heads ``H`` on this rank (a multiple of ``Hkv``).
        dtype: the queries' dtype (the model's).
        force_triton: launch on CPU tensors too (``TRITON_INTERPRET=1`` tests).
    Returns:
        The query lengths launched.
    Raises:
        ValueError: inconsistent shapes (:func:`prefill_attention`).
    """
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    lengths = warm_up_lengths(next_power_of_2(num_heads // kv_heads))
    dev = k_cache.device
    for n in lengths:
        q = torch.zeros(n, num_heads, head_dim, dtype=dtype, device=dev)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        tables = torch.zeros(1, cdiv(n, block_size), dtype=torch.int32, device=dev)
        prefill_attention(q, k_cache, v_cache, cu, cu, tables, n, n, head_dim ** -0.5, force_triton=force_triton)
    return lengths


__all__ = ["prefill_attention", "prefill_attention_triton", "warm_up_lengths", "warm_up_prefill_attention"]
