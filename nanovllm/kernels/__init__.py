"""Attention kernels over the paged KV cache: Triton kernels with PyTorch references.

Public API (each dispatches to Triton when the tensors are on CUDA or ``force_triton=True``, else to the
PyTorch reference in :mod:`nanovllm.kernels.reference`):

- :func:`store_kvcache` - write new tokens' K/V into the cache by slot (slot -1 = padding, skipped).
- :func:`prefill_attention` - causal varlen attention of packed new tokens over their paged contexts.
- :func:`decode_attention` - one query token per sequence, split-KV (flash-decoding) on the GPU.

Design notes: docs/attention.md.
"""
from .decode_attention import choose_num_splits, decode_attention, decode_attention_triton
from .kv_store import store_kvcache, store_kvcache_triton
from .prefill_attention import prefill_attention, prefill_attention_triton
from .reference import decode_attention_ref, prefill_attention_ref, store_kvcache_ref

__all__ = [
    "choose_num_splits",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "prefill_attention",
    "prefill_attention_ref",
    "prefill_attention_triton",
    "store_kvcache",
    "store_kvcache_ref",
    "store_kvcache_triton",
]
