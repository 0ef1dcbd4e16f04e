"""Qwen3's per-head q/k RMSNorm + RoPE (and Llama's RoPE) as opaque ops (one Triton kernel on the GPU,
:mod:`nanovllm.kernels.qk_norm_rope`; the PyTorch path elsewhere).

    q, k = torch.ops.nanovllm.qk_norm_rope(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)
    q = torch.ops.nanovllm.qk_norm_rope_store(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads,
                                              eps, layer_idx)
    q = torch.ops.nanovllm.rope_store(qkv, cos_sin, positions, num_heads, num_kv_heads, layer_idx)  # no norm: Llama

The second and third also write the step's new k (rotated) and v into the layer's paged KV cache, which they take,
with the slot mapping, from :mod:`nanovllm.utils.context` like ``torch.ops.nanovllm.attention`` does; the model
follows them with ``torch.ops.nanovllm.attention_cached(q, layer_idx, scale)`` (nanovllm/layers/attention.py),
which reads the cache without storing. The models use them on CUDA; on the CPU they keep the plain PyTorch chain.
"""
from __future__ import annotations

import torch

from fusion_pass.registration import define_op
from nanovllm.kernels.qk_norm_rope import qk_norm_rope as _qk_norm_rope
from nanovllm.kernels.qk_norm_rope import qk_norm_rope_store as _qk_norm_rope_store
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import get_context


def _qk_norm_rope_impl(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin: torch.Tensor,
                 positions: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, H, D], k [T, Hkv, D])``: every q / k head of ``qkv [T, (H + 2 Hkv) D]`` RMS-normalized with its own
    weight and rotated by RoPE at ``positions``. See :func:`nanovllm.kernels.qk_norm_rope.qk_norm_rope` (contract,
    rounding, errors)."""
    return _qk_norm_rope(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)


def _qk_norm_rope_fake(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin: torch.Tensor,
      positions: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = q_weight.shape[0]
    t = qkv.shape[0]
    return qkv.new_empty((t, num_heads, d)), qkv.new_empty((t, num_kv_heads, d))


def _qk_norm_rope_store_impl(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                             eps: float, layer_idx: int) -> torch.Tensor:
    """q ``[T, H, D]`` as :func:`_qk_norm_rope_impl` gives it; the rotated k heads and the v heads of ``qkv`` go into
    layer ``layer_idx``'s KV cache at the context's slot mapping (negative slot: padding, not stored). Without a
    cache for the layer (the profiling pass before the cache exists) nothing is stored. See
    :func:`nanovllm.kernels.qk_norm_rope.qk_norm_rope_store`."""
    ctx = get_context()
    if layer_idx >= len(ctx.kv_caches):
        return _qk_norm_rope(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)[0]
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    return _qk_norm_rope_store(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps,
                               k_cache, v_cache, ctx.slot_mapping)


def _rope_store_impl(qkv: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int,
                     num_kv_heads: int, layer_idx: int) -> torch.Tensor:
    """:func:`_qk_norm_rope_store_impl` without the q/k norm: RoPE of q and k (the Llama family), the store of the
    rotated k and of v into layer ``layer_idx``'s cache, q ``[T, H, D]`` returned."""
    ctx = get_context()
    if layer_idx >= len(ctx.kv_caches):  # no cache yet: q alone, by the PyTorch path
        d = cos_sin.shape[1]
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, -1)
        return RotaryEmbedding._rotate(qkv[:, :num_heads * d].reshape(-1, num_heads, d), cos, sin)
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    return _qk_norm_rope_store(qkv, None, None, cos_sin, positions, num_heads, num_kv_heads, 0.0, k_cache, v_cache,
                               ctx.slot_mapping)


def _rope_store_fake(qkv: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int,
                     num_kv_heads: int, layer_idx: int) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, cos_sin.shape[1]))


def _qk_norm_rope_store_fake(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             cos_sin: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                             eps: float, layer_idx: int) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, q_weight.shape[0]))


# torch.library.Library-defined (fusion_pass/registration.py: less host time per call than custom_op)
qk_norm_rope = define_op("nanovllm::qk_norm_rope", _qk_norm_rope_impl, _qk_norm_rope_fake)
# The cache write is invisible to the graph (the cache is no input, as for torch.ops.nanovllm.attention): what
# orders it before the attention that reads the cache is that attention_cached takes this op's q as its input.
qk_norm_rope_store = define_op("nanovllm::qk_norm_rope_store", _qk_norm_rope_store_impl, _qk_norm_rope_store_fake)
rope_store = define_op("nanovllm::rope_store", _rope_store_impl, _rope_store_fake)
