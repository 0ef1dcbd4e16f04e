"""Single-token decode attention over the paged KV cache with split-KV (Triton kernels + dispatch).

Algorithm: flash-decoding (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for long-context inference").
The context of each sequence is cut into ``BLOCK_N``-token tiles, dealt round-robin to ``num_splits`` splits:
split ``s`` takes tiles ``s, s + num_splits, s + 2 num_splits, ...``. Kernel 1, one program per ``(sequence, kv
head, split)`` on a flat grid ordered sequence-major (programs start in batch order):
each program runs one split for all ``G = H // Hkv`` query heads of one kv head (so each K/V tile is loaded once
for the whole group; the ``G`` rows are padded to at least 16 for ``tl.dot``), with an online softmax (base 2,
float32) over its tiles, and writes the partial ``(max m_s, sum l_s, unnormalized acc_s)``. Kernel 2, grid
``(B, H)``: combines the partials of the non-empty splits,

    M = max_s m_s,  w_s = 2^(m_s - M),  o = sum_s w_s acc_s / sum_s w_s l_s,

which is exact (the same rescaling identity as the online softmax; the order of the tiles does not matter).
With ``num_splits == 1`` kernel 1 writes the normalized output directly and kernel 2 is skipped.

The number of splits depends only on static quantities (``B``, ``Hkv``, the SM count and the context bound
``W * block_size`` from the block-table width, or ``max_context_len`` if given), never on ``context_lens``'
values, so the launch needs no device->host sync and can be captured in a CUDA graph. Dealing tiles
round-robin (rather than cutting the bound into ``num_splits`` contiguous partitions) keeps every split busy
whatever the actual context length: a CUDA graph captured for ``max_model_len = 4096`` that decodes a
512-token context still spreads its 8 tiles over 8 splits, where contiguous partitions would give all 8 tiles
to split 0. Splits with no tile (``s * BLOCK_N >= context length``) exit at once and are ignored by the
reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import cdiv, launch_options, next_power_of_2, sm_count, use_pdl

from .attention_common import LOG2E, check_out, check_paged_attention_args, online_softmax_tile
from .reference import decode_attention_ref

# Tunables (see docs/attention.md and benchmarks/kernels.py --what attention).
DECODE_BLOCK_N = 64  # key positions per tile
DECODE_MIN_TILES_PER_SPLIT = 1  # a split covers at least this many tiles of the context bound
DECODE_WAVES = 4  # aim for about this many programs per SM
DECODE_MAX_SPLITS = 64


def choose_num_splits(batch: int, num_kv_heads: int, max_context_len: int, sm_count: int, block_n: int = DECODE_BLOCK_N) -> int:
    """Number of KV partitions per sequence for split-KV decode.

    Enough ``(sequence, kv head, split)`` programs to give every SM about ``DECODE_WAVES`` of them, but no more
    splits than tiles in the context bound (over ``DECODE_MIN_TILES_PER_SPLIT``) and at most
    ``DECODE_MAX_SPLITS``.

    Args:
        batch: number of sequences ``B``.
        num_kv_heads: ``Hkv`` (one program covers all query heads of one kv head).
        max_context_len: an upper bound on the context length of any sequence (tokens).
        sm_count: streaming multiprocessors on the device (132 on an H200).
        block_n: tile size; partitions are a whole number of tiles.

    Returns:
        ``num_splits >= 1``.
    """
    programs = max(1, batch * num_kv_heads)
    want = cdiv(DECODE_WAVES * sm_count, programs)
    by_len = max(1, cdiv(max(1, max_context_len), DECODE_MIN_TILES_PER_SPLIT * block_n))
    return max(1, min(want, by_len, DECODE_MAX_SPLITS))


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    ctx_ptr,
    o_ptr,
    m_part_ptr,
    l_part_ptr,
    acc_part_ptr,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    qk_scale,
    num_splits,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    # One flat grid, the kv head fastest, then the split, the sequence slowest: programs start in batch order, so
    # a batch sorted longest context first (the scheduler's decode order) starts its longest programs first and
    # its shortest ones fill the tail (longest-processing-time-first list scheduling, Graham 1969).
    pid = tl.program_id(0)
    kv_head = pid % (NUM_HEADS // GROUP)
    split = (pid // (NUM_HEADS // GROUP)) % num_splits
    seq = pid // (NUM_HEADS // GROUP) // num_splits
    if USE_PDL:  # q and the newest K/V come from the previous kernels (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    ctx_len = tl.load(ctx_ptr + seq)
    # Splits without a tile exit; split 0 always runs so a padding row (ctx_len == 0) still gets a defined 0 output.
    if (split > 0) & (split * BLOCK_N >= ctx_len):
        return

    r = tl.arange(0, ROWS)
    row_ok = r < GROUP
    head = kv_head * GROUP + r
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kh

    num_full = ctx_len // BLOCK_N
    # This split's whole tiles, unmasked (MASKED=False): tiles split, split + num_splits, ... CAUSAL=False: the
    # one query token sees every key < ctx_len, so q_pos (0 here) is not read.
    for tile in range(split, num_full, num_splits):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, tile * BLOCK_N, 0, ctx_len, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            stride_kb, stride_kt, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, False, False, DOT_PRECISION,
        )
    # The partial last tile (masked at ctx_len) belongs to the split whose turn it is.
    if (num_full * BLOCK_N < ctx_len) & (num_full % num_splits == split):
        acc, m_i, l_i = online_softmax_tile(
            acc, m_i, l_i, q, num_full * BLOCK_N, 0, ctx_len, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            stride_kb, stride_kt, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, True, False, DOT_PRECISION,
        )

    if DIRECT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + seq.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:
        # Partials are contiguous [B, H, num_splits] (m, l) and [B, H, num_splits, D] (acc).
        part = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + split
        tl.store(m_part_ptr + part, m_i, mask=row_ok)
        tl.store(l_part_ptr + part, l_i, mask=row_ok)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    ctx_ptr,
    o_ptr,
    m_part_ptr,
    l_part_ptr,
    acc_part_ptr,
    stride_ob,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """o[seq, head] = the softmax-weighted combination of the head's non-empty split partials (module docstring)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx_len = tl.load(ctx_ptr + seq)
    used = tl.cdiv(ctx_len, BLOCK_N)  # splits s < used hold at least one tile
    s = tl.arange(0, SPLITS_PAD)
    s_ok = (s < used) & (s < num_splits)
    base = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits
    m = tl.load(m_part_ptr + base + s, mask=s_ok, other=-1.0e30)
    l = tl.load(l_part_ptr + base + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_ok, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, 0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_part_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(o_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`decode_attention` (same contract plus tuning overrides)."""
    _check_decode_shapes(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = check_out(out, q)
    if batch == 0:
        return out
    bn = block_n or DECODE_BLOCK_N
    bound = block_tables.shape[1] * block_size
    if max_context_len is not None:
        bound = min(bound, max_context_len)
    if num_splits is None:
        sms = sm_count(q.device) if q.is_cuda else 132
        num_splits = choose_num_splits(batch, num_kv_heads, bound, sms, bn)
    num_splits = max(1, int(num_splits))
    direct = num_splits == 1
    splits_pad = max(2, next_power_of_2(num_splits))
    if direct:
        m_part = l_part = acc_part = out  # unused
    else:
        m_part = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    rows = max(16, next_power_of_2(group))
    pdl = use_pdl(q)
    _decode_split_kernel[(batch * num_kv_heads * num_splits,)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m_part,
        l_part,
        acc_part,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        float(scale) * LOG2E,
        num_splits,
        NUM_HEADS=num_heads,
        GROUP=group,
        ROWS=rows,
        BLOCK_N=bn,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        DIRECT=direct,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=pdl,
        num_warps=4,
        num_stages=3,
        **launch_options(pdl),
    )
    if not direct:
        _decode_reduce_kernel[(batch, num_heads)](
            context_lens,
            out,
            m_part,
            l_part,
            acc_part,
            out.stride(0),
            out.stride(1),
            num_splits,
            NUM_HEADS=num_heads,
            SPLITS_PAD=splits_pad,
            BLOCK_N=bn,
            HEAD_DIM=head_dim,
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


def _check_decode_shapes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> None:
    """Validate the decode launcher's arguments (see :func:`decode_attention`); raises ValueError."""
    check_paged_attention_args(q, k_cache, v_cache)
    batch = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] < batch or block_tables.dtype != torch.int32:
        raise ValueError("block_tables must be int32 [B, W]")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must have a contiguous last dim")
    if context_lens.shape[0] < batch:
        raise ValueError("context_lens must have B entries")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    force_triton: bool = False,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its whole paged context.

    Args:
        q: ``[B, H, D]`` fp16/bf16/fp32, last dim contiguous; ``D`` a power of two >= 16.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous; ``H % Hkv == 0``.
        block_tables: int32 ``[B, W]``, rows padded with -1 (never dereferenced).
        context_lens: int32 ``[B]``, tokens of context including the new one (``<= W * block_size``);
            a row with ``context_lens == 0`` (batch padding) gets an all-zero output.
        scale: softmax scale (usually ``D ** -0.5``).
        force_triton: run the Triton kernels on CPU tensors (``TRITON_INTERPRET=1`` tests).
        num_splits: Triton path only; override the split-KV partition count (default: :func:`choose_num_splits`).
        max_context_len: Triton path only; optional host-side bound on ``context_lens`` (tighter than
            ``W * block_size``) used to size the partitions. Must be a true upper bound.

    Returns:
        ``o``: ``[B, H, D]`` in ``q.dtype``.

    The Triton path does no device->host synchronization (CUDA-graph capturable).

    Raises:
        ValueError: on inconsistent shapes/dtypes.
    """
    if q.is_cuda or force_triton:
        return decode_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, scale,
            num_splits=num_splits, max_context_len=max_context_len, out=out,
        )
    o = decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    if out is None:
        return o
    return check_out(out, q).copy_(o)
