"""The Llama family's decoder (Touvron et al. 2023, arXiv 2302.13971 / 2307.09288; Llama 3, arXiv 2407.21783):
pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP, RMSNorm, an LM head tied to the embedding or not.

Llama 2 / 3.x, SmolLM / SmolLM2 and TinyLlama checkpoints are this model as is; the other families subclass it
and change only what differs (qwen2.py: bias on q/k/v; qwen3.py: per-head q/k RMSNorm; mistral.py: no change
without sliding windows). The shapes every checkpoint tensor must have follow from the config
(:meth:`LlamaForCausalLM.expected_tensors`), which the loader checks before it reads any weight.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
import nanovllm.layers.qk_norm_rope_op  # noqa: F401 - registers torch.ops.nanovllm.rope_store / qk_norm_rope_store
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.parallel import tp_size


def head_dim_of(config: PretrainedConfig) -> int:
    """``config.head_dim``, or ``hidden_size // num_attention_heads`` where the config has none (Llama 2)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    """qkv projection -> RoPE on q and k (:meth:`rotate`) -> paged attention -> output projection.

    Args:
        config: the checkpoint's config.
        layer_idx: the layer's index (selects its KV cache).
        rotary_emb: the RoPE table, one shared by every layer.
        qkv_bias: whether q, k and v projections carry a bias; o_bias: whether the output projection does.
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool) -> None:
        super().__init__()
        tp = tp_size()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_key_value_heads // tp
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, layer_idx)
        # the Triton kernel of rotate_store handles power-of-two head sizes
        self.fused_store = self.head_dim >= 2 and self.head_dim & (self.head_dim - 1) == 0

    def rotate(self, positions: torch.Tensor, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[T, H * D]`` and k ``[T, Hkv * D]`` (views of ``qkv``) -> rotated ``(q [T, H, D], k [T, Hkv, D])``."""
        return self.rotary_emb(positions, q.view(-1, self.num_heads, self.head_dim),
                               k.view(-1, self.num_kv_heads, self.head_dim))

    def rotate_store(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """CUDA: RoPE on q and k and the KV-cache store of k and v in one Triton kernel (layers/qk_norm_rope_op.py):
        qkv ``[T, (H + 2 Hkv) D]`` -> rotated q ``[T, H, D]``."""
        return torch.ops.nanovllm.rope_store(qkv, self.rotary_emb.cos_sin_cache, positions, self.num_heads,
                                             self.num_kv_heads, self.attn.layer_idx)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """positions int64 ``[T]``, hidden ``[T, hidden]`` (the normalized input) -> ``[T, hidden]``."""
        qkv = self.qkv_proj(hidden)
        if qkv.is_cuda and self.fused_store:  # the attention reads the cache that rotate_store wrote
            return self.o_proj(self.attn.forward_cached(self.rotate_store(positions, qkv)))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
        q, k = self.rotate(positions, qkv, q, k)
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up merged into one weight.

    The activation belongs to ``down_proj`` (``input_act="silu_mul"``): on the GPU it runs in the prologue of the
    small-M GEMV (no separate SiLU-and-mul kernel at decode); on the CPU it is the same ``F.silu(gate) * up``.
    """

    def __init__(self, config: PretrainedConfig, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias,
                                           input_act="silu_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]`` -> ``[T, hidden]``."""
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual add is folded into the following RMSNorm."""

    def __init__(self, config: PretrainedConfig, self_attn: LlamaAttention, mlp_bias: bool) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = LlamaMLP(config, mlp_bias)
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


class LlamaModel(nn.Module):
    """Embedding and decoder layers; returns the last layer's output and residual (before the final norm)."""

    def __init__(self, config: PretrainedConfig, layers: list[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden, residual  # type: ignore[return-value]


class LlamaForCausalLM(nn.Module):
    """The full model. ``packed_modules_mapping`` tells the loader which checkpoint tensors are merged where.

    Subclasses change the family's differences through :attr:`attention_cls` and :meth:`biases` (and extend
    :meth:`expected_tensors` for tensors of their own).
    """

    attention_cls: type[LlamaAttention] = LlamaAttention
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @staticmethod
    def biases(config: PretrainedConfig) -> tuple[bool, bool, bool]:
        """``(qkv_bias, o_bias, mlp_bias)``: Llama's ``attention_bias`` covers q, k, v and o; ``mlp_bias`` the MLP."""
        attention = bool(getattr(config, "attention_bias", False))
        return attention, attention, bool(getattr(config, "mlp_bias", False))

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        qkv_bias, o_bias, mlp_bias = self.biases(config)
        rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config), config.max_position_embeddings)
        layers = [LlamaDecoderLayer(config, self.attention_cls(config, i, rotary_emb, qkv_bias, o_bias), mlp_bias)
                  for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, layers)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def expected_tensors(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """The checkpoint tensors (Hugging Face names) and the full, unsharded shapes the config implies.

        Returns:
            ``(required, optional)``: ``optional`` holds ``lm_head.weight`` when the head is tied to the embedding
            (a checkpoint may store it or not).
        """
        c = self.config
        hidden, d, inter = c.hidden_size, head_dim_of(c), c.intermediate_size
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        qkv_bias, o_bias, mlp_bias = self.biases(c)
        head = {"lm_head.weight": (c.vocab_size, hidden)}
        required: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, hidden),
                                                "model.norm.weight": (hidden,)}
        if not self.tie_word_embeddings:
            required.update(head)
        shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                  "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                  "mlp.down_proj": (hidden, inter)}
        with_bias = {"self_attn.q_proj": qkv_bias, "self_attn.k_proj": qkv_bias, "self_attn.v_proj": qkv_bias,
                     "self_attn.o_proj": o_bias, "mlp.gate_proj": mlp_bias, "mlp.up_proj": mlp_bias,
                     "mlp.down_proj": mlp_bias}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            required[p + "input_layernorm.weight"] = (hidden,)
            required[p + "post_attention_layernorm.weight"] = (hidden,)
            for name, shape in shapes.items():
                required[p + name + ".weight"] = shape
                if with_bias[name]:
                    required[p + name + ".bias"] = shape[:1]
        return required, ({} if not self.tie_word_embeddings else head)

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
