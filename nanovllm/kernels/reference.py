"""PyTorch reference implementations of the paged-KV-cache attention kernels.

These are the "obviously correct" versions of the three kernels in this package. They read and write the
same paged layout as the Triton kernels, do all softmax math in float32 and return the query dtype. They
are used (a) as the ground truth in tests and benchmarks and (b) as the CPU path of the engine, so they are
vectorized per sequence (prefill) or per batch (decode) instead of looping over tokens in Python.

Layout (see docs/attention.md):
    k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous.
    slot = block_id * block_size + offset_in_block; slot -1 means "padding, do not store".
    block_tables: int32 ``[B, max_num_blocks]``, each row padded with -1 past the sequence's blocks.

GQA convention (same as Hugging Face ``repeat_kv``): query head ``h`` reads kv head ``h // (H // Hkv)``.
"""
from __future__ import annotations

import torch

# Upper bound on the number of float32 attention-score elements materialized at once by the references
# (keeps the CPU engine's memory bounded for long prompts / big batches): 32 Mi elements = 128 MiB.
_MAX_SCORE_ELEMENTS = 1 << 25


def store_kvcache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the K/V of ``N`` new tokens into the paged cache (in place).

    Args:
        key, value: ``[N, Hkv, D]``, any strides, cache dtype (cast if not).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous.
        slot_mapping: integer ``[N]``; token ``i`` goes to flat slot ``slot_mapping[i]``; ``-1`` = skip.

    Raises:
        ValueError: if the shapes do not match.
    """
    _check_store_shapes(key, value, k_cache, v_cache, slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    k_flat[slots] = key[keep].to(k_cache.dtype)
    v_flat[slots] = value[keep].to(v_cache.dtype)


def _check_store_shapes(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must be equal 4-D shapes, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    expected = (slot_mapping.shape[0], k_cache.shape[2], k_cache.shape[3])
    if tuple(key.shape) != expected or tuple(value.shape) != expected:
        raise ValueError(f"key/value must be {expected}, got {tuple(key.shape)}, {tuple(value.shape)}")


def _gather_context(cache: torch.Tensor, block_row: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """Return the first ``ctx_len`` tokens of one sequence, ``[ctx_len, Hkv, D]``, read through its block row."""
    block_size = cache.shape[1]
    num_blocks = (ctx_len + block_size - 1) // block_size
    blocks = block_row[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, cache.shape[2], cache.shape[3])[:ctx_len]


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Causal variable-length attention of packed new tokens over their paged contexts (float32 math).

    Sequence ``b`` has ``q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` new tokens and context length
    ``ctx_len = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` (cached prefix + new tokens, ``q_len <= ctx_len``).
    New token ``i`` is at absolute position ``ctx_len - q_len + i`` and attends to positions ``<=`` that.
    All context K/V (including the new tokens' K/V, already stored) is read through ``block_tables[b]``.

    Args:
        q: ``[N, H, D]`` with ``N = cu_seqlens_q[-1]``.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        block_tables: int32 ``[B, W]``, padded with -1.
        max_seqlen_q, max_seqlen_k: unused here (kept for the common signature).
        scale: softmax scale, usually ``D ** -0.5``.

    Returns:
        ``[N, H, D]`` in ``q.dtype``: ``softmax(scale * q k^T + causal_mask) v`` per head.

    Raises:
        ValueError: if ``H`` is not a multiple of ``Hkv`` or ``q_len > ctx_len`` for some sequence.
    """
    del max_seqlen_q, max_seqlen_k
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        q_start, q_len = cu_q[b], cu_q[b + 1] - cu_q[b]
        ctx_len = cu_k[b + 1] - cu_k[b]
        if q_len == 0:
            continue
        if q_len > ctx_len:
            raise ValueError(f"sequence {b}: q_len {q_len} > ctx_len {ctx_len}")
        k = _gather_context(k_cache, block_tables[b], ctx_len).float()  # [ctx, Hkv, D]
        v = _gather_context(v_cache, block_tables[b], ctx_len).float()
        key_pos = torch.arange(ctx_len, device=q.device)
        # Chunk the queries so that at most _MAX_SCORE_ELEMENTS scores exist at once.
        chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads * ctx_len))
        for c0 in range(0, q_len, chunk):
            c1 = min(q_len, c0 + chunk)
            qc = q[q_start + c0 : q_start + c1].float().view(c1 - c0, num_kv_heads, group, head_dim)
            scores = torch.einsum("qkgd,nkd->kgqn", qc, k) * scale  # [Hkv, G, qc, ctx]
            q_pos = ctx_len - q_len + torch.arange(c0, c1, device=q.device)
            visible = key_pos[None, :] <= q_pos[:, None]  # [qc, ctx]
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            oc = torch.einsum("kgqn,nkd->qkgd", probs, v)
            out[q_start + c0 : q_start + c1] = oc.reshape(c1 - c0, num_heads, head_dim).to(q.dtype)
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its whole paged context (float32 math).

    Args:
        q: ``[B, H, D]``.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``.
        block_tables: int32 ``[B, W]``, padded with -1 (padding entries are never read).
        context_lens: int32 ``[B]``, context length including the new token; 0 (batch padding) gives zeros.
        scale: softmax scale.

    Returns:
        ``[B, H, D]`` in ``q.dtype``.

    Raises:
        ValueError: if ``H`` is not a multiple of ``Hkv``.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    lens = context_lens.long()
    max_len = max(1, int(lens.max().item()))
    num_blocks = (max_len + block_size - 1) // block_size
    padded_len = num_blocks * block_size
    # Process the batch in chunks so the gathered K/V stays bounded.
    per_seq = max(1, padded_len * num_kv_heads * head_dim)
    chunk = max(1, _MAX_SCORE_ELEMENTS // per_seq)
    key_pos = torch.arange(padded_len, device=q.device)
    for b0 in range(0, batch, chunk):
        b1 = min(batch, b0 + chunk)
        # Padding (-1) entries are replaced by block 0; their positions are masked out below.
        blocks = block_tables[b0:b1, :num_blocks].long().clamp(min=0)
        k = k_cache[blocks].reshape(b1 - b0, padded_len, num_kv_heads, head_dim).float()
        v = v_cache[blocks].reshape(b1 - b0, padded_len, num_kv_heads, head_dim).float()
        qb = q[b0:b1].float().view(b1 - b0, num_kv_heads, group, head_dim)
        scores = torch.einsum("bkgd,bnkd->bkgn", qb, k) * scale
        visible = key_pos[None, :] < lens[b0:b1, None]  # [b, n]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with ctx_len == 0 -> zeros
        # Slots past the context were never written (they may hold NaN); 0 * NaN would leak into the sum.
        v = v.masked_fill(~visible[:, :, None, None], 0.0)
        ob = torch.einsum("bkgn,bnkd->bkgd", probs, v)
        out[b0:b1] = ob.reshape(b1 - b0, num_heads, head_dim).to(q.dtype)
    return out
