"""Qwen2 / Qwen2.5 (Qwen team, 2024, arXiv 2407.10671): the Llama decoder with a bias on the q, k and v
projections (none on o or the MLP)."""
from __future__ import annotations

from transformers import PretrainedConfig

from nanovllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v bias."""

    @staticmethod
    def biases(config: PretrainedConfig) -> tuple[bool, bool, bool]:
        return True, False, False
