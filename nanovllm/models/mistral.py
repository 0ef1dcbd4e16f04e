"""Mistral (Jiang et al. 2023, arXiv 2310.06825) without sliding-window attention: the Llama decoder as is.

The registry (models/registry.py) refuses a checkpoint whose ``sliding_window`` is shorter than the engine's
``max_model_len``, since the paged attention here always attends to the whole context.
"""
from __future__ import annotations

from nanovllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layers, Mistral's checkpoint names (the same as Llama's)."""
