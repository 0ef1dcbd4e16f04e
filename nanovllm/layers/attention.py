"""Paged attention as one opaque custom op, so the whole model compiles to a single graph.

``torch.ops.nanovllm.attention(q, k, v, layer_idx, scale)`` stores the new keys and values into the layer's
paged KV cache (by slot mapping) and attends over everything cached for each sequence (through its block
table). It reads the step's metadata and the KV caches from :mod:`nanovllm.utils.context`, which the model
runner fills before each step; Dynamo and Inductor see only an op with a fake implementation.

``torch.ops.nanovllm.attention_cached(q, layer_idx, scale)`` is the same attention without the store, for a model
whose previous op has already written the step's K/V into the cache (Qwen3 on CUDA:
``torch.ops.nanovllm.qk_norm_rope_store``, nanovllm/layers/qk_norm_rope_op.py, stores inside its kernel).
"""
from __future__ import annotations

import torch
from torch import nn

from fusion_pass.registration import define_op
from nanovllm.kernels import decode_attention, prefill_attention, store_kvcache
from nanovllm.utils.context import get_context


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    """q ``[T, H, D]``, k and v ``[T, Hkv, D]`` of the step's new tokens -> attention output ``[T, H, D]``.

    Without a KV cache for ``layer_idx`` (the profiling pass before the cache exists), nothing is stored and
    the output is zeros of the right shape: only its memory footprint matters there.
    """
    ctx = get_context()
    if layer_idx >= len(ctx.kv_caches):
        return torch.zeros_like(q)
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    store_kvcache(k, v, k_cache, v_cache, ctx.slot_mapping)
    return _paged_attention_cached(q, layer_idx, scale)


def _paged_attention_cached(q: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    """q ``[T, H, D]`` -> attention output ``[T, H, D]`` over the layer's cache, which already holds the step's new
    K/V (nothing is stored here). Zeros without a KV cache for ``layer_idx``, as :func:`_paged_attention`."""
    ctx = get_context()
    if layer_idx >= len(ctx.kv_caches):
        return torch.zeros_like(q)
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    if ctx.is_prefill:
        return prefill_attention(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables,
                                 ctx.max_seqlen_q, ctx.max_seqlen_k, scale)
    return decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)


def _paged_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                          scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def _paged_attention_cached_fake(q: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


# torch.library.Library-defined (fusion_pass/registration.py: less host time per call than custom_op)
paged_attention = define_op("nanovllm::attention", _paged_attention, _paged_attention_fake)
# Reads a cache that an earlier op wrote; the graph orders the two only through q, the writer's output.
paged_attention_cached = define_op("nanovllm::attention_cached", _paged_attention_cached,
                                   _paged_attention_cached_fake)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads (GQA, Ainslie et al. 2023) over the paged KV cache.

    Args:
        num_heads: query heads on this rank.
        num_kv_heads: key/value heads on this rank (divides num_heads).
        head_dim: size of one head.
        layer_idx: index of the layer, which selects its KV cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, H, D]``, k and v ``[T, Hkv, D]`` -> ``[T, H * D]``."""
        o = torch.ops.nanovllm.attention(q, k, v, self.layer_idx, self.scale)
        return o.flatten(-2)

    def forward_cached(self, q: torch.Tensor) -> torch.Tensor:
        """q ``[T, H, D]`` -> ``[T, H * D]``, the step's K/V already in the cache: ``q`` must be the output of the op
        that stored them (``torch.ops.nanovllm.qk_norm_rope_store``), which orders the store before this read
        under Inductor and in CUDA graphs (the cache write itself is not visible to the graph)."""
        return torch.ops.nanovllm.attention_cached(q, self.layer_idx, self.scale).flatten(-2)
