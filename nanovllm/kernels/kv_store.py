"""Write the K/V of new tokens into the paged KV cache (Triton kernel + dispatch).

One Triton program per token: it reads the token's slot, skips padding (slot -1), and copies the
``[Hkv, D]`` key and value tiles to ``cache_flat[slot]`` where ``cache_flat = cache.view(-1, Hkv, D)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusion_pass.launch import launch_options, next_power_of_2, use_pdl
from .reference import _check_store_shapes, store_kvcache_ref


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    token = tl.program_id(0)
    if USE_PDL:  # everything depends on the previous kernels (fusion_pass/launch.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(key_ptr + token.to(tl.int64) * stride_kn + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token.to(tl.int64) * stride_vn + h * stride_vh + d, mask=mask)
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of :func:`store_kvcache` (same contract). The last dim of key/value must be contiguous."""
    _check_store_shapes(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    pdl = use_pdl(key)
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
        USE_PDL=pdl,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
        **launch_options(pdl),
    )


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    force_triton: bool = False,
) -> None:
    """Write the K/V of ``N`` new tokens into the paged cache by slot (in place).

    Args:
        key, value: ``[N, Hkv, D]`` (last dim contiguous; other strides free, e.g. views of a fused qkv output).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, contiguous; written in their own dtype.
        slot_mapping: int32 ``[N]``, ``slot = block_id * block_size + offset``; ``-1`` = padding, not stored.
        force_triton: run the Triton kernel even on CPU tensors (for ``TRITON_INTERPRET=1`` tests).

    Uses Triton when the tensors are on CUDA or ``force_triton``; the PyTorch reference otherwise.

    Raises:
        ValueError: on mismatched shapes or non-contiguous caches.
    """
    if key.is_cuda or force_triton:
        store_kvcache_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_ref(key, value, k_cache, v_cache, slot_mapping)
