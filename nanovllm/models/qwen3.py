"""Qwen3 dense models (Qwen team, 2025): the Llama decoder with a per-head RMSNorm of q and k before RoPE."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of


class Qwen3Attention(LlamaAttention):
    """Llama attention whose q and k heads are RMS-normalized (own weights ``[head_dim]``) before RoPE."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool) -> None:
        super().__init__(config, layer_idx, rotary_emb, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def rotate_store(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """CUDA: q/k norm + RoPE and the KV-cache store in one Triton kernel (layers/qk_norm_rope_op.py):
        qkv ``[T, (H + 2 Hkv) D]`` -> q ``[T, H, D]``."""
        return torch.ops.nanovllm.qk_norm_rope_store(qkv, self.q_norm.weight, self.k_norm.weight,
                                                     self.rotary_emb.cos_sin_cache, positions, self.num_heads,
                                                     self.num_kv_heads, self.q_norm.eps, self.attn.layer_idx)

    def rotate(self, positions: torch.Tensor, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalize then rotate: q ``[T, H * D]``, k ``[T, Hkv * D]`` -> ``(q [T, H, D], k [T, Hkv, D])``."""
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        return self.rotary_emb(positions, q, k)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: ``attention_bias`` covers q, k, v and o (off in the released models); no MLP bias; q/k norm."""

    attention_cls = Qwen3Attention

    @staticmethod
    def biases(config: PretrainedConfig) -> tuple[bool, bool, bool]:
        attention = bool(getattr(config, "attention_bias", False))
        return attention, attention, False

    def expected_tensors(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """Llama's tensors and each layer's ``q_norm`` / ``k_norm`` weights ``[head_dim]``."""
        required, optional = super().expected_tensors()
        d = head_dim_of(self.config)
        for i in range(self.config.num_hidden_layers):
            for norm in ("q_norm", "k_norm"):
                required[f"model.layers.{i}.self_attn.{norm}.weight"] = (d,)
        return required, optional
