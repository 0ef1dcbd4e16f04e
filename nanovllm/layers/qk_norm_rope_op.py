"""``torch.ops.nanovllm.qk_norm_rope``: Qwen3's per-head q/k RMSNorm + RoPE as one opaque op (one Triton kernel on
the GPU, :mod:`nanovllm.kernels.qk_norm_rope`; the PyTorch path elsewhere).

    q, k = torch.ops.nanovllm.qk_norm_rope(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, eps)

The model uses it on CUDA; on the CPU it keeps the plain PyTorch chain.
"""
from __future__ import annotations

import torch

from fusion_pass.registration import define_op
from nanovllm.kernels.qk_norm_rope import qk_norm_rope as _qk_norm_rope


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


# torch.library.Library-defined (fusion_pass/registration.py: less host time per call than custom_op)
qk_norm_rope = define_op("nanovllm::qk_norm_rope", _qk_norm_rope_impl, _qk_norm_rope_fake)
