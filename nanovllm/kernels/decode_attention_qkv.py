"""Decode attention that starts from the fused qkv projection: q/k RMSNorm + RoPE of the new token, its KV-cache
store and split-KV attention in one kernel (plus the split reduce of :mod:`nanovllm.kernels.decode_attention`).

Algorithms: split-KV decode attention as in :mod:`nanovllm.kernels.decode_attention` (flash-decoding: Dao, Haziza,
Massa, Sizov, 2023), with the online softmax of FlashAttention (Dao et al. 2022); RoPE as in
:mod:`nanovllm.kernels.qk_norm_rope` (RoFormer: Su et al. 2021, "rotate half" layout).

At batch 1 a decode layer runs ``qkv GEMV -> q/k norm + RoPE + KV store -> split-KV attention -> reduce -> o_proj``,
and every kernel boundary costs about as much as a small kernel's work (docs/performance.md, "Where a batch-1 decode
step goes"). Here the attention's split kernel does the second kernel's work itself:

* each program ``(sequence, kv head, split)`` reads its ``G`` query heads from the ``qkv`` row, normalizes and
  rotates them in registers (the arithmetic and roundings of :mod:`nanovllm.kernels.qk_norm_rope`, written for a
  whole head at once: ``out[d] = n[d] cos + s(d) n[d +- D/2] sin`` with ``s = -1`` on the first half), and does
  the same for its kv head's new key; the value is the ``qkv`` row's v head;
* the cache is read for the ``ctx_len - 1`` positions written by earlier steps only; the new token's position is
  handled by the split whose turn its tile is, from registers, as one more online-softmax step (same rescaling as
  :func:`nanovllm.kernels.attention_common.online_softmax_tile`, the probability rounded to the cache dtype before
  it multiplies the value, as ``tl.dot`` gets it there);
* that same program writes the new key and value into the paged cache at the token's slot (nothing for a negative
  slot), the only writer of that slot in the launch and the only reader of that position.

The result equals :func:`nanovllm.kernels.qk_norm_rope_store` followed by
:func:`nanovllm.kernels.decode_attention` up to float32 summation order (the new position's score is a sum of
products instead of a ``tl.dot``; the head norm sums over the whole head instead of two halves).

Public API: :func:`decode_attention_qkv` (Triton on CUDA / ``force_triton``, the two-step reference otherwise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import launch_options, next_power_of_2, use_pdl

from .attention_common import LOG2E, check_out
from .decode_attention import (DECODE_BLOCK_N, _check_decode_shapes, reduce_splits, split_partials, split_tiles,
                               write_split_result)
from .qk_norm_rope import qk_norm_rope_store
from .reference import decode_attention_ref


@triton.jit
def _norm_rope_heads(x, xp, w_ptr, d, partner, cos, sin, sgn, eps, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """Rows ``x`` ``[R, D]`` (model dtype) and ``xp`` (the same rows with the two halves swapped) -> RMSNorm (weight
    at ``w_ptr``, only with ``NORM``) then RoPE, rounded like ``_qk_norm_rope_kernel``; returns ``[R, D]`` in the
    model dtype."""
    dt = x.dtype
    f, fp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(f * f, axis=1) / HEAD_DIM + eps)
        w = tl.load(w_ptr + d)[None, :]
        wp = tl.load(w_ptr + partner)[None, :]
        n = ((f * inv[:, None]).to(dt) * w).to(dt).to(tl.float32)
        n_p = ((fp * inv[:, None]).to(dt) * wp).to(dt).to(tl.float32)
    else:
        n, n_p = f, fp
    return (n * cos[None, :] + (sgn[None, :] * n_p) * sin[None, :]).to(dt)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_qkv_split_kernel(qkv_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, bt_ptr,
                             ctx_ptr, o_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, stride_qkv, stride_cs, stride_ob,
                             stride_oh, stride_kb, stride_kt, stride_kh, stride_bt, qk_scale, eps, num_splits,
                             NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             HEAD_DIM: tl.constexpr, NORM: tl.constexpr, DIRECT: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program ``(seq, kv_head, split)``: the prologue (module docstring), then the split's tiles of the cached
    positions ``[0, ctx_len - 1)`` dealt round-robin as in ``_decode_split_kernel``, the new position by the split
    that owns its tile, and the partials (or, with ``DIRECT``, the normalized output)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:  # qkv comes from the previous kernel (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    ctx_len = tl.load(ctx_ptr + seq)
    # Splits without a tile exit; split 0 always runs so a padding row (ctx_len == 0) still gets a defined 0 output.
    if (split > 0) & (split * BLOCK_N >= ctx_len):
        return
    HALF: tl.constexpr = HEAD_DIM // 2
    r = tl.arange(0, ROWS)
    row_ok = r < GROUP
    head = kv_head * GROUP + r
    d = tl.arange(0, HEAD_DIM)
    first_half = d < HALF
    partner = tl.where(first_half, d + HALF, d - HALF)
    sgn = tl.where(first_half, -1.0, 1.0)
    token = qkv_ptr + seq.to(tl.int64) * stride_qkv
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + d % HALF)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d % HALF)
    q_rows = token + head[:, None] * HEAD_DIM
    q = _norm_rope_heads(tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0),
                         tl.load(q_rows + partner[None, :], mask=row_ok[:, None], other=0.0), qw_ptr, d, partner, cos,
                         sin, sgn, eps, HEAD_DIM, NORM)
    k_row = token + (NUM_HEADS + kv_head) * HEAD_DIM
    k_new = _norm_rope_heads(tl.load(k_row + d)[None, :], tl.load(k_row + partner)[None, :], kw_ptr, d, partner,
                             cos, sin, sgn, eps, HEAD_DIM, NORM)  # [1, D]
    v_new = tl.load(token + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + d)[None, :]  # [1, D]
    cache_dt = k_cache_ptr.dtype.element_ty
    q = q.to(cache_dt)

    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    cached = tl.maximum(ctx_len - 1, 0)  # positions written by earlier steps
    acc, m_i, l_i = split_tiles(acc, m_i, l_i, q, split, num_splits, cached, k_cache_ptr, v_cache_ptr, bt_row_ptr,
                                kv_head_off, stride_kb, stride_kt, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM,
                                DOT_PRECISION)
    # The new position belongs to the split whose turn its tile (the last one) is.
    if (ctx_len > 0) & ((cached // BLOCK_N) % num_splits == split):
        k_c = k_new.to(cache_dt)
        v_c = v_new.to(cache_dt)
        s = tl.sum(q.to(tl.float32) * k_c.to(tl.float32), axis=1) * qk_scale  # [ROWS], log2 domain
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(cache_dt).to(tl.float32)[:, None] * v_c.to(tl.float32)
        m_i = m_new
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
        tl.store(k_cache_ptr + dst, k_c, mask=slot >= 0)
        tl.store(v_cache_ptr + dst, v_c, mask=slot >= 0)
    write_split_result(acc, m_i, l_i, o_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, seq, head, row_ok, d, split,
                       num_splits, stride_ob, stride_oh, NUM_HEADS, HEAD_DIM, DIRECT)


def decode_attention_qkv(qkv: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                         cos_sin: torch.Tensor, positions: torch.Tensor, eps: float, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, num_heads: int, num_kv_heads: int, scale: float,
                         force_triton: bool = False, num_splits: int | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention from the ``qkv`` projection output; stores the new tokens' K/V.

    Args:
        qkv, q_weight, k_weight, cos_sin, positions, eps, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads:
            as for :func:`nanovllm.kernels.qk_norm_rope_store` (``[B, (H + 2 Hkv) D]``, one new token per
            sequence; both weights None: RoPE only, the Llama family).
        block_tables, context_lens, scale, num_splits: as for :func:`nanovllm.kernels.decode_attention`
            (``context_lens`` counts the new token).
        force_triton: run the Triton kernels on CPU tensors (``TRITON_INTERPRET=1`` tests).
        out: optional ``[B, H, D]`` output in ``qkv.dtype``.

    Returns:
        ``o [B, H, D]`` in ``qkv.dtype``.

    Raises:
        ValueError: inconsistent shapes or dtypes (the checks of both functions above).
    """
    if not (qkv.is_cuda or force_triton):
        q = qk_norm_rope_store(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps, k_cache,
                               v_cache, slot_mapping)
        o = decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
        return o if out is None else check_out(out, o).copy_(o)
    batch, head_dim = qkv.shape[0], cos_sin.shape[1]
    o = torch.empty((batch, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    # the argument checks of the two steps this kernel replaces (no work: zero tokens are stored)
    qk_norm_rope_store(qkv[:0], q_weight, k_weight, cos_sin, positions[:0], num_heads, num_kv_heads, eps, k_cache,
                       v_cache, slot_mapping[:0], force_triton=True)
    _check_decode_shapes(o, k_cache, v_cache, block_tables, context_lens)
    if positions.shape != (batch,) or slot_mapping.shape != (batch,):
        raise ValueError(f"positions and slot_mapping must be [{batch}], got {tuple(positions.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    out = o if out is None else check_out(out, o)
    if batch == 0:
        return out
    block_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    bn = DECODE_BLOCK_N
    num_splits, (m_part, l_part, acc_part) = split_partials(out, num_kv_heads, block_tables.shape[1] * block_size,
                                                           num_splits, bn)
    direct = num_splits == 1
    norm = q_weight is not None and k_weight is not None
    cs = cos_sin.contiguous()
    qw, kw = (q_weight.contiguous(), k_weight.contiguous()) if norm else (cs, cs)  # unused without the norm
    pdl = use_pdl(qkv)
    _decode_qkv_split_kernel[(batch, num_kv_heads, num_splits)](
        qkv, qw, kw, cs, positions, slot_mapping, k_cache, v_cache, block_tables, context_lens, out, m_part, l_part,
        acc_part, qkv.stride(0), cs.stride(0), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), float(scale) * LOG2E, float(eps), num_splits,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, ROWS=max(16, next_power_of_2(group)),
        BLOCK_N=bn, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, NORM=norm, DIRECT=direct,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", USE_PDL=pdl, num_warps=4, num_stages=3,
        **launch_options(pdl))
    if not direct:
        reduce_splits(context_lens, out, (m_part, l_part, acc_part), num_splits, bn)
    return out

