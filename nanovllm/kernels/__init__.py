"""Attention kernels over the paged KV cache and the sampling kernel: Triton kernels with PyTorch references.

Public API (each dispatches to Triton when the tensors are on CUDA or ``force_triton=True``, else to the
PyTorch reference in :mod:`nanovllm.kernels.reference`, or in :mod:`nanovllm.kernels.sampling` for sampling):

- :func:`store_kvcache` - write new tokens' K/V into the cache by slot (slot -1 = padding, skipped).
- :func:`prefill_attention` - causal varlen attention of packed new tokens over their paged contexts.
- :func:`decode_attention` - one query token per sequence, split-KV (flash-decoding) on the GPU.
- :func:`sample_tokens` - one token per row, greedy or temperature sampling (Gumbel-max on a Philox stream), one
  pass over the logits; the reference is :func:`sample_tokens_ref` on :func:`sample_uniforms_ref`.
- :func:`qk_norm_rope` - Qwen3's per-head q/k RMSNorm + RoPE in one kernel; the reference is
  :func:`qk_norm_rope_ref`. :func:`qk_norm_rope_store` - the same kernel that also writes the token's K/V into
  the cache (the model's GPU path).

Design notes: docs/attention.md (attention), the docstring of :mod:`nanovllm.kernels.sampling` (sampling).
"""
from .decode_attention import choose_num_splits, decode_attention, decode_attention_triton
from .kv_store import store_kvcache, store_kvcache_triton
from .prefill_attention import prefill_attention, prefill_attention_triton
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, qk_norm_rope_store
from .reference import decode_attention_ref, prefill_attention_ref, store_kvcache_ref
from .sampling import (choose_sample_splits, sample_tokens, sample_tokens_ref, sample_tokens_triton,
                       sample_uniforms_ref)

__all__ = [
    "choose_num_splits",
    "choose_sample_splits",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "prefill_attention",
    "prefill_attention_ref",
    "prefill_attention_triton",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "qk_norm_rope_store",
    "sample_tokens",
    "sample_tokens_ref",
    "sample_tokens_triton",
    "sample_uniforms_ref",
    "store_kvcache",
    "store_kvcache_ref",
    "store_kvcache_triton",
]
