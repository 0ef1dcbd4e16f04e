"""Kernel accounting of a profiled decode step: the category of each GPU activity (fused norm+linear, gemm,
attention, KV store, Inductor, sampler, memcpy, other) and the per-step means of the GPU time per category, the
GPU busy time and the top kernels (used by :mod:`.profile_decode`)."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from .decode_trace import StepProfile

CATEGORIES: list[str] = ["fused_norm_linear", "gemm", "attention", "kv_store", "inductor", "sampler", "memcpy",
                         "other"]

_GEMM_RE = re.compile(r"gemm|gemv|cutlass|xmma|nvjet|splitkreduce|cublas|s16816|s1688|wgmma", re.IGNORECASE)
_SAMPLER_RE = re.compile(r"softmax|argmax|argmin|exponential|distribution|philox|curand|reduce_kernel|sort|"
                         r"cumsum|scan", re.IGNORECASE)
_COPY_RE = re.compile(r"memcpy|memset|direct_copy|copy_kernel|fillfunctor|fill_kernel", re.IGNORECASE)


def categorize(name: str, activity: str = "kernel", phase: str | None = None) -> str:
    """The category of one GPU activity.

    Args:
        name: the kernel name as CUPTI reports it (demangled for C++ kernels, the function name for Triton ones).
        activity: the trace category: "kernel", "gpu_memcpy" or "gpu_memset".
        phase: the engine phase that launched it (see :data:`.decode_trace.PHASES`) when known.

    Returns:
        one of :data:`CATEGORIES`.
    """
    if "_decode_split_kernel" in name or "_decode_reduce_kernel" in name or "_prefill_kernel" in name:
        return "attention"
    if "_store_kvcache" in name:
        return "kv_store"
    if not name.startswith("triton_") and ("_fused_" in name or "_rms_norm_kernel" in name):
        return "fused_norm_linear"
    if phase == "sampler":
        return "sampler"
    if "memcpy" in activity.lower() or "memset" in activity.lower():
        return "memcpy"
    if name.startswith("triton_") or "_qk_norm_rope_kernel" in name:
        return "inductor"
    if _GEMM_RE.search(name):
        return "gemm"
    if _SAMPLER_RE.search(name):
        return "sampler"
    if _COPY_RE.search(name):
        return "memcpy"
    return "other"


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, start + duration) spans."""
    total, end = 0.0, float("-inf")
    for s, d in sorted(spans):
        e = s + d
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def aggregate(steps: list[StepProfile], top_n: int) -> dict[str, Any]:
    """Per-step means of the GPU figures of the profiled steps.

    Returns:
        dict: gpu_kernel_ms, gpu_busy_ms, kernels (count per step), categories {cat: {ms, count, share}},
        by_phase_ms {phase or 'unknown': ms}, top_kernels [{name, category, count, ms, us_per_call, share}],
        per_step_gpu_busy_ms (list).
    """
    n = max(len(steps), 1)
    cat_us: dict[str, float] = defaultdict(float)
    cat_n: dict[str, int] = defaultdict(int)
    phase_us: dict[str, float] = defaultdict(float)
    kern: dict[str, list[Any]] = {}
    busy_per_step: list[float] = []
    total_us = 0.0
    count = 0
    for st in steps:
        busy_per_step.append(_union_us([(a[2], a[3]) for a in st.activities]) / 1e3)
        for name, act, _ts, dur, phase in st.activities:
            c = categorize(name, act, phase)
            cat_us[c] += dur
            cat_n[c] += 1
            phase_us[phase or "unknown"] += dur
            total_us += dur
            count += 1
            k = kern.setdefault(name, [c, 0, 0.0])
            k[1] += 1
            k[2] += dur
    cats = {c: {"ms": round(cat_us[c] / n / 1e3, 5), "count": round(cat_n[c] / n, 2),
                "share": round(cat_us[c] / total_us, 4) if total_us > 0 else None} for c in CATEGORIES}
    top = sorted(kern.items(), key=lambda kv: -kv[1][2])[:top_n]
    return {
        "gpu_kernel_ms": round(total_us / n / 1e3, 5),
        "gpu_busy_ms": round(sum(busy_per_step) / n, 5),
        "kernels": round(count / n, 2),
        "categories": cats,
        "gpu_ms_by_launching_phase": {p: round(v / n / 1e3, 5) for p, v in sorted(phase_us.items())},
        "top_kernels": [{"name": name[:200], "category": c, "count": round(cnt / n, 2),
                         "ms": round(us / n / 1e3, 5), "us_per_call": round(us / cnt, 2),
                         "share": round(us / total_us, 4) if total_us > 0 else None}
                        for name, (c, cnt, us) in top],
        "per_step_gpu_busy_ms": [round(b, 5) for b in busy_per_step],
    }
