"""Output of the decode profile: the result JSON document (before any case runs, and a skipped mode's entry)
and the summary, roofline and top-kernel tables printed at the end (used by :mod:`.profile_decode`)."""
from __future__ import annotations

import argparse
from typing import Any

from . import floors, provenance, tables
from .decode_kernels import CATEGORIES


def print_report(result: dict[str, Any], top: int = 8) -> None:
    """The summary table, the roofline table, and each case's top kernels."""
    cases = [(m, b, c) for m, r in result["modes"].items() for b, c in (r.get("batches") or {}).items()
             if "error" not in c]
    gpu = result["meta"]["gpu"].get("name")
    short = {"fused_norm_linear": "fused", "gemm": "gemm", "attention": "attn", "kv_store": "kv st",
             "inductor": "induct", "sampler": "sampl", "memcpy": "copy", "other": "other"}
    rows = [[m, int(b), c["wall_ms"], c["gpu_busy_ms"], c["host_ms"]] + [c["categories"][k]["ms"] for k in CATEGORIES]
            + [c["kernels"], c["floor_ms"], c["fraction_of_floor"]] for m, b, c in cases]
    tables.print_table(["mode", "B", "wall", "GPU busy", "host~"] + [short[k] for k in CATEGORIES]
                       + ["kernels", "floor", "floor/wall"], rows,
                       title=f"Decode step, ms per step (prompt {result['prompt_len']}, {result['steps']} steps; "
                             f"host~ = wall - GPU busy, an estimate), {gpu}")
    rows = []
    for m, b, c in cases:
        for g, v in c["roofline"].items():
            rows.append([m, int(b), g, v["bytes"] / 1e6, v["floor_ms"], v["achieved_ms"], v["fraction_of_floor"]])
    tables.print_table(["mode", "B", "group", "MB moved", "floor ms", "achieved ms", "floor/achieved"], rows,
                       title=f"Roofline at {result['bandwidth_bytes_per_s'] / 1e12:g} TB/s "
                             f"(step: floor vs wall time)")
    if cases and not any(c.get("cuda_activity") for _, _, c in cases):
        print("\nno CUDA activity recorded (CPU run): the GPU categories are empty and host~ is the whole step")
    for m, b, c in cases:
        tables.print_table(["ms/step", "calls/step", "us/call", "category", "kernel"],
                           [[k["ms"], k["count"], k["us_per_call"], k["category"], k["name"][:90]]
                            for k in c["top_kernels"][:top]], title=f"top kernels, {m}, B={b}")
        print("host phases (profiled, ms/step): " + ", ".join(f"{p} {v:.3f}" for p, v in c["host_phases_ms"].items()))


def new_result(args: argparse.Namespace, batches: list[int], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document before any case runs (``meta``: default :func:`provenance.run_metadata`)."""
    return {
        "benchmark": "decode-profile",
        "model": args.model,
        "method": "torch.profiler (CPU + CUDA) over --steps engine decode steps per (mode, batch), one engine per "
                  "mode; GPU activities tied to steps and engine phases by CUPTI correlation id, categorized by "
                  "kernel name; wall_ms = median unprofiled step time; host_ms = wall_ms - gpu_busy_ms is an "
                  "ESTIMATE (GPU idle time within a step, attributed to the host); floors = minimum bytes / "
                  "bandwidth (or FLOPs / peak when larger). See the module docstring.",
        "units": "ms per decode step; counts per step; bytes per step",
        "prompt_len": args.prompt_len, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "temperature": args.temperature, "batch_sizes": batches, "max_num_seqs": args.max_num_seqs,
        "bandwidth_bytes_per_s": floors.bandwidth_bytes_per_s(),
        "peak_flop_per_s": floors.PEAK_BF16_FLOP_PER_S,
        "categories": CATEGORIES,
        "modes": {},
        "meta": provenance.run_metadata() if meta is None else meta,
    }


def skipped_mode(mode: str, batches: list[int], note: str) -> dict[str, Any]:
    """The entry of a mode whose engine was not built."""
    return {"mode": mode, "skipped": list(batches), "batches": {}, "note": note}
