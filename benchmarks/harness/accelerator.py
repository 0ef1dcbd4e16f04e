"""The accelerator: what it is (name, count, memory, the short kind that names a results folder), waiting for its
queued work, and releasing its memory between engines.

torch is imported inside the functions, so importing this module needs no GPU (nor torch).
"""
from __future__ import annotations

import gc
import os
import platform
import re
import time
from typing import Any


def gpu_info() -> dict[str, Any]:
    """Accelerator description: name, count, memory (GiB), CUDA runtime version; ``{"name": "cpu"}`` without CUDA."""
    try:
        import torch
    except Exception:  # noqa: BLE001
        return {"name": "unknown (torch not importable)"}
    if not torch.cuda.is_available():
        return {"name": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda}


def gpu_name() -> str:
    """Full name of CUDA device 0 (e.g. "NVIDIA H100 80GB HBM3"), or "cpu" without CUDA."""
    info = gpu_info()
    return str(info.get("name", "cpu"))


def gpu_slug(name: str | None = None) -> str:
    """Short GPU kind used as the results folder name: "h100", "h200", "a100"... from a device name such as
    "NVIDIA H200" or "NVIDIA H100 80GB HBM3"; "cpu" without CUDA; else the name lowercased with non-alphanumerics
    replaced by "-".

    Args:
        name: a device name (default: :func:`gpu_name`).
    """
    name = gpu_name() if name is None else name
    m = re.search(r"\b([A-Z]\d{2,3})\b", name.upper())
    if name.lower() == "cpu":
        return "cpu"
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def synchronize() -> None:
    """``torch.cuda.synchronize()`` when CUDA is available (so wall-clock timings include queued GPU work)."""
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` between two device synchronisations; return (result, seconds of wall clock)."""
    synchronize()
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    synchronize()
    return r, time.perf_counter() - t0


def free_accelerator_memory(report: bool = False) -> None:
    """``torch._dynamo.reset()``, ``gc.collect()``, ``torch.cuda.empty_cache()`` when CUDA is present; with
    ``report``, print the GPU memory still allocated / reserved (a leak here shrinks the next engine's KV cache
    or makes it run out of memory)."""
    try:
        import torch
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if report:
                free, total = torch.cuda.mem_get_info()
                print(f"[cleanup] GPU memory after release: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                      f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB, free {free / 2**30:.1f} of "
                      f"{total / 2**30:.1f} GiB", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[cleanup] {type(e).__name__}: {e}")
