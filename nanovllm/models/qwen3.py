"""Qwen3 dense models (Qwen team, 2025): GQA attention with q/k RMSNorm and RoPE, SwiGLU MLP, pre-norm blocks."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.qk_norm_rope_op import FUSED_QK_NORM_ROPE
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.parallel import tp_size


class Qwen3Attention(nn.Module):
    """qkv projection -> per-head RMSNorm of q and k -> RoPE -> paged attention -> output projection."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        tp = tp_size()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_key_value_heads // tp
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table shared by every layer
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)
        # q/k norm + RoPE as one Triton kernel on the GPU (layers/qk_norm_rope_op.py; NANOVLLM_FUSED_QK_NORM_ROPE=0: off)
        self.fused_qk_norm_rope = FUSED_QK_NORM_ROPE

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """positions int64 ``[T]``, hidden ``[T, hidden]`` (the normalized input) -> ``[T, hidden]``."""
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
        if self.fused_qk_norm_rope and qkv.is_cuda:
            q, k = torch.ops.nanovllm.qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight,
                                                   self.rotary_emb.cos_sin_cache, positions, self.num_heads,
                                                   self.num_kv_heads, self.q_norm.eps)
        else:
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
            q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(o)


class Qwen3MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up merged into one weight.

    The activation belongs to ``down_proj`` (``input_act="silu_mul"``): on the GPU it runs in the prologue of the
    small-M GEMV (no separate SiLU-and-mul kernel at decode); on the CPU it is the same ``F.silu(gate) * up``.
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, input_act="silu_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]`` -> ``[T, hidden]``."""
        return self.down_proj(self.gate_up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block; the residual add is folded into the following RMSNorm."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx, rotary_emb)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual ``[T, hidden]`` (residual None in the first layer) -> (MLP output, new residual)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    """Embedding and decoder layers; returns the last layer's output and residual (before the final norm)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_theta = getattr(config, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, float(rope_theta))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual  # type: ignore[return-value]


class Qwen3ForCausalLM(nn.Module):
    """The full model. ``packed_modules_mapping`` tells the loader which checkpoint tensors are merged where."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.model = Qwen3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids: int64 ``[T]`` the step's new tokens, sequences packed one after another.
            positions: int64 ``[T]`` their positions in their sequences.
            logits_indices: int64 ``[B]`` the rows whose next-token logits are wanted (each sequence's last).

        Returns:
            logits ``[B, vocab]`` in the model's dtype.
        """
        hidden, residual = self.model(input_ids, positions)
        # Selecting rows before the final norm is exact (the norm is per row) and keeps norm -> lm_head adjacent,
        # so the fusion pass sees that site too.
        hidden, _ = self.model.norm(hidden[logits_indices], residual[logits_indices])
        return self.lm_head(hidden)
