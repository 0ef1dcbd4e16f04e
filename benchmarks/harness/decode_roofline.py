"""Bytes-floor accounting of a decode step: the model's shapes from config.json, the minimum bytes and FLOPs each
group of kernels (linear, attention, KV store, sampler) must move or do in one decode step, their floor times at
the GPU's bandwidth and peak, and each group's floor against the time its kernels took (used by
:mod:`.profile_decode`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .decode_kernels import CATEGORIES

# roofline groups: the categories whose kernels do the work the floor counts
GROUPS: dict[str, list[str]] = {
    "linear": ["fused_norm_linear", "gemm"],
    "attention": ["attention"],
    "kv_store": ["kv_store"],
    "sampler": ["sampler"],
}


@dataclass
class ModelShape:
    """The sizes the roofline needs, from config.json, and the engine's element size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype_bytes: int) -> "ModelShape":
        h = int(hf["hidden_size"])
        nh = int(hf["num_attention_heads"])
        return cls(hidden=h, layers=int(hf["num_hidden_layers"]), heads=nh, kv_heads=int(hf["num_key_value_heads"]),
                   head_dim=int(hf.get("head_dim") or h // nh), inter=int(hf["intermediate_size"]),
                   vocab=int(hf["vocab_size"]), dtype_bytes=dtype_bytes)

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """{site: (N, K, count per step)} of every linear of one decode step (lm_head tied or not: read once)."""
        h, d = self.hidden, self.head_dim
        return {"qkv_proj": ((self.heads + 2 * self.kv_heads) * d, h, self.layers),
                "o_proj": (h, self.heads * d, self.layers),
                "gate_up_proj": (2 * self.inter, h, self.layers),
                "down_proj": (h, self.inter, self.layers),
                "lm_head": (self.vocab, h, 1)}

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (114,688 for Qwen3-0.6B in bf16)."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.dtype_bytes

    def describe(self) -> dict[str, Any]:
        lin = self.linears()
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "intermediate": self.inter, "vocab": self.vocab,
                "dtype_bytes": self.dtype_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "linear_weight_bytes": {k: n * kk * c * self.dtype_bytes for k, (n, kk, c) in lin.items()},
                "linear_weight_bytes_total": sum(n * kk * c for n, kk, c in lin.values()) * self.dtype_bytes}


def roofline(shape: ModelShape, batch: int, live_tokens: float, bandwidth: float, peak_flops: float
             ) -> dict[str, dict[str, float]]:
    """Bytes / FLOPs each group must at least move / do in one decode step, and the floor time in ms.

    Args:
        shape: the model.
        batch: sequences in the step.
        live_tokens: sum over the sequences of their context length (tokens whose K and V attention reads).
        bandwidth: bytes/s; peak_flops: FLOP/s.

    Returns:
        {group: {bytes, flop, bytes_floor_ms, compute_floor_ms, floor_ms}} for the groups of :data:`GROUPS` and
        ``step`` (their sum).
    """
    eb = shape.dtype_bytes
    lin_bytes = lin_flop = 0.0
    for n, k, count in shape.linears().values():
        lin_bytes += count * (n * k + batch * (n + k)) * eb
        lin_flop += count * 2.0 * batch * n * k
    q_bytes = shape.layers * batch * shape.heads * shape.head_dim * eb
    attn_bytes = live_tokens * shape.kv_bytes_per_token + 2 * q_bytes  # K/V read, q read, output written
    attn_flop = 4.0 * shape.layers * shape.heads * shape.head_dim * live_tokens  # q.k and p.v
    out: dict[str, dict[str, float]] = {}
    for g, b, f in (("linear", lin_bytes, lin_flop), ("attention", attn_bytes, attn_flop),
                    ("kv_store", 2.0 * batch * shape.kv_bytes_per_token, 0.0),
                    ("sampler", float(batch * shape.vocab * eb), 0.0)):
        bf, cf = b / bandwidth * 1e3, f / peak_flops * 1e3
        out[g] = {"bytes": b, "flop": f, "bytes_floor_ms": bf, "compute_floor_ms": cf, "floor_ms": max(bf, cf)}
    out["step"] = {k: sum(v[k] for v in out.values()) for k in ("bytes", "flop", "bytes_floor_ms",
                                                                   "compute_floor_ms", "floor_ms")}
    return out


def shape_getter(hf: dict[str, Any], store: dict[str, Any]) -> Callable[[Any], ModelShape]:
    """``shape_of(llm)``: the :class:`ModelShape` of config.json ``hf`` at the engine's element size; it also puts
    its description under ``store["model_shape"]`` (merged into the result JSON)."""
    def shape_of(llm: Any) -> ModelShape:
        itemsize = int(getattr(llm.config.torch_dtype, "itemsize", 2))
        s = ModelShape.from_hf(hf, itemsize)
        store["model_shape"] = s.describe()
        return s
    return shape_of


def floor_groups(roof: dict[str, dict[str, float]], categories: dict[str, dict[str, Any]], gpu_busy_ms: float,
                 wall_ms: float) -> dict[str, Any]:
    """Each roofline group's floor against the time its kernels took, and each category's floor.

    Args:
        roof: :func:`roofline` of the step.
        categories: ``aggregate(...)["categories"]`` (:func:`benchmarks.harness.decode_kernels.aggregate`); each
            entry gets ``floor_group``, ``floor_ms`` and ``fraction_of_floor`` (the floor of a group of one category,
            else None) added in place.
        gpu_busy_ms: GPU busy time per step (ms); wall_ms: median wall time per step (ms).

    Returns:
        {group: {categories, bytes, flop, bytes_floor_ms, compute_floor_ms, floor_ms, achieved_ms,
        achieved_bytes_per_s, fraction_of_floor}} for the groups of :data:`GROUPS` and ``step`` (whose achieved
        time is the wall time, with ``fraction_of_floor_vs_gpu_busy`` too).
    """
    groups: dict[str, Any] = {}
    for g, cats in list(GROUPS.items()) + [("step", CATEGORIES)]:
        achieved = sum(categories[c]["ms"] for c in cats)
        r = roof[g]
        groups[g] = {"categories": cats, "bytes": int(r["bytes"]), "flop": int(r["flop"]),
                     "bytes_floor_ms": round(r["bytes_floor_ms"], 5),
                     "compute_floor_ms": round(r["compute_floor_ms"], 5), "floor_ms": round(r["floor_ms"], 5),
                     "achieved_ms": round(achieved, 5),
                     "achieved_bytes_per_s": round(r["bytes"] / (achieved / 1e3), 0) if achieved > 0 else None,
                     "fraction_of_floor": round(r["floor_ms"] / achieved, 4) if achieved > 0 else None}
    groups["step"]["achieved_ms"] = round(wall_ms, 5)  # the whole step: its floor against the wall time
    groups["step"]["achieved_bytes_per_s"] = round(roof["step"]["bytes"] / (wall_ms / 1e3), 0) if wall_ms > 0 else None
    groups["step"]["fraction_of_floor"] = round(roof["step"]["floor_ms"] / wall_ms, 4) if wall_ms > 0 else None
    groups["step"]["fraction_of_floor_vs_gpu_busy"] = (round(roof["step"]["floor_ms"] / gpu_busy_ms, 4)
                                                       if gpu_busy_ms > 0 else None)
    cat_floor = {c: g for g, cs in GROUPS.items() for c in cs}
    for c, v in categories.items():
        g = cat_floor.get(c)
        v["floor_group"] = g
        v["floor_ms"] = groups[g]["floor_ms"] if g and len(GROUPS[g]) == 1 else None
        v["fraction_of_floor"] = (round(groups[g]["floor_ms"] / v["ms"], 4)
                                  if g and len(GROUPS[g]) == 1 and v["ms"] > 0 else None)
    return groups
