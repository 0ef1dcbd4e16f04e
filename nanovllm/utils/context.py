"""Per-step attention metadata, shared between the model runner and the attention layers.

The model runner fills one :class:`Context` before each forward pass; every attention layer reads it
through :func:`get_context`. Keeping it in a module-level slot (instead of threading it through every
module's ``forward``) lets the whole model be traced by ``torch.compile`` as one graph: attention is an
opaque custom op (``torch.ops.nanovllm.attention``) that looks the context up at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """Attention metadata of one model step.

    Attributes:
        is_prefill: True for a prefill (or chunked-prefill) step, False for a decode step.
        cu_seqlens_q: int32 ``[B + 1]``; prefix sums of the new (query) token counts per sequence. Prefill only.
        cu_seqlens_k: int32 ``[B + 1]``; prefix sums of the context lengths (cached prefix + new tokens). Prefill only.
        max_seqlen_q: the largest query length in the batch. Prefill only.
        max_seqlen_k: the largest context length in the batch. Prefill only.
        slot_mapping: int32 ``[num_tokens]``; for each new token, its slot in the paged KV cache
            (``block_id * block_size + offset``); -1 marks a padding token whose K/V is not stored.
        context_lens: int32 ``[B]``; the context length of each sequence including the new token(s).
        block_tables: int32 ``[B, max_num_blocks]``; the KV block ids of each sequence, padded with -1.
        kv_caches: per layer, ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    """

    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


_CONTEXT = Context()


def get_context() -> Context:
    """Return the metadata of the step being run."""
    return _CONTEXT


def set_context(
    is_prefill: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    slot_mapping: torch.Tensor | None = None,
    context_lens: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Install the metadata of the next step (see :class:`Context` for shapes and dtypes)."""
    global _CONTEXT
    _CONTEXT = Context(
        is_prefill, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, slot_mapping, context_lens, block_tables,
        kv_caches if kv_caches is not None else [],
    )


def reset_context() -> None:
    """Drop the metadata of the last step (so no tensor of it is kept alive)."""
    global _CONTEXT
    _CONTEXT = Context()
