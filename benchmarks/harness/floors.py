"""Bandwidth and compute floors of a generation workload: the GPU's copy bandwidth and bf16 peak, a Qwen3 model's
sizes from its config.json, and the per-decode-step roofline lower bound on a batch workload's time.

torch is imported only inside :func:`bandwidth_bytes_per_s`, so importing this module needs no GPU.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any


# Used where no GPU is present to measure the copy bandwidth (CPU smoke tests, plots of old results): the
# device-to-device copy bandwidth measured on an H200. On a GPU, :func:`bandwidth_bytes_per_s` measures it.
DEFAULT_BANDWIDTH_BYTES_PER_S: float = 4.3e12
# Dense bf16 matrix-multiply throughput measured on an H200 (the H100 SXM has the same GH100 compute); the compute
# side of the floor matters only for prefill and large decode batches.
PEAK_BF16_FLOP_PER_S: float = 790e12


@functools.lru_cache(maxsize=1)
def bandwidth_bytes_per_s() -> float:
    """This GPU's device-to-device copy bandwidth in bytes/s (:func:`benchmarks.harness.timing.copy_bandwidth`,
    measured once per process), or :data:`DEFAULT_BANDWIDTH_BYTES_PER_S` without CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return DEFAULT_BANDWIDTH_BYTES_PER_S
    except Exception:  # noqa: BLE001
        return DEFAULT_BANDWIDTH_BYTES_PER_S
    from .timing import copy_bandwidth
    return copy_bandwidth()["bytes_per_s"]


def qwen3_sizes(hf_config: dict[str, Any], dtype_bytes: int = 2) -> dict[str, float]:
    """Parameter count, bytes of weights read per step, KV bytes per token, FLOPs per token of a Qwen3 model.

    Args:
        hf_config: the checkpoint's config.json as a dict (hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim, intermediate_size, vocab_size, tie_word_embeddings).
        dtype_bytes: bytes per weight / KV element (2 for bf16).

    Returns:
        dict: params (count, tied lm_head counted once), weight_bytes (read once per decode step: params *
        dtype_bytes), kv_bytes_per_token (K and V over all layers), flop_per_token (2 * params, the
        usual approximation: 2 * 0.596e9 for Qwen3-0.6B).
    """
    h = int(hf_config["hidden_size"])
    n_layers = int(hf_config["num_hidden_layers"])
    n_heads = int(hf_config["num_attention_heads"])
    n_kv = int(hf_config["num_key_value_heads"])
    d = int(hf_config.get("head_dim") or h // n_heads)
    inter = int(hf_config["intermediate_size"])
    vocab = int(hf_config["vocab_size"])
    tied = bool(hf_config.get("tie_word_embeddings", False))
    per_layer = (h * (n_heads + 2 * n_kv) * d  # qkv
                 + n_heads * d * h               # o
                 + 3 * h * inter                 # gate, up, down
                 + 2 * h + 2 * d)                # input/post norms, q_norm, k_norm
    params = vocab * h * (1 if tied else 2) + n_layers * per_layer + h
    return {"params": float(params), "weight_bytes": float(params * dtype_bytes),
            "kv_bytes_per_token": float(n_layers * n_kv * d * 2 * dtype_bytes), "flop_per_token": float(2 * params)}


def bandwidth_floor(prompt_lens: Sequence[int], output_lens: Sequence[int], weight_bytes: float = 1.19e9,
                    kv_bytes_per_token: float = 28 * 8 * 128 * 2 * 2, flop_per_token: float = 2 * 0.596e9,
                    bandwidth: float = DEFAULT_BANDWIDTH_BYTES_PER_S, peak_flops: float = PEAK_BF16_FLOP_PER_S,
                    ) -> dict[str, float]:
    """Lower bound on the time of a batch-generation workload, a roofline per decode step.

    Every decode step s reads all weights once plus the K and V of every live sequence (prompt + s tokens),
    unless the step's FLOPs take longer: t_s = max((W + sum(live) * KVT) / BW, n_live * F / PEAK).
    Prefill is compute bound: sum(prompt tokens) * F / PEAK. Defaults: Qwen3-0.6B in bf16; pass the measured ``bandwidth`` of the GPU.

    Args:
        prompt_lens: prompt length of each request (tokens).
        output_lens: output tokens of each request.
        weight_bytes, kv_bytes_per_token, flop_per_token: model sizes (see :func:`qwen3_sizes`).
        bandwidth: bytes/s; peak_flops: FLOP/s.

    Returns:
        dict: output_tokens, decode_floor_s, prefill_floor_s, floor_s, output_tokens_per_s (the ceiling on
        output tokens/s: output_tokens / floor_s), and the constants used.
    """
    t = 0.0
    pairs = list(zip(prompt_lens, output_lens))
    for s in range(max(output_lens, default=0)):
        live = [p + s for p, o in pairs if s < o]
        t += max((weight_bytes + sum(live) * kv_bytes_per_token) / bandwidth, len(live) * flop_per_token / peak_flops)
    pre = sum(prompt_lens) * flop_per_token / peak_flops
    total_out = int(sum(output_lens))
    return {"output_tokens": total_out, "decode_floor_s": round(t, 4), "prefill_floor_s": round(pre, 4),
            "floor_s": round(t + pre, 4),
            "output_tokens_per_s": round(total_out / (t + pre), 1) if t + pre > 0 else float("nan"),
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "flop_per_token": flop_per_token,
            "bandwidth_bytes_per_s": bandwidth, "peak_flop_per_s": peak_flops,
            "method": "per decode step max((W + live KV bytes)/BW, FLOPs/peak); "
                      "prefill = prompt tokens * FLOP/token / peak"}


def load_hf_config(model_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict ({} if it cannot be read)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001
        return {}
