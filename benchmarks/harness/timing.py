"""Timing primitives shared by the benchmarks: medians, device-event and CUDA-graph timing of a callable,
interleaved A/B pairs, and the device-to-device copy bandwidth that every bytes floor divides by.

torch is imported inside the functions, so importing this module needs no GPU.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count).

    Raises:
        ValueError: the sequence is empty.
    """
    if not xs:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(xs))


def ratio_stats(ratios: Sequence[float]) -> dict[str, float]:
    """median, min, max and count of per-pair ratios (ValueError when empty)."""
    return {"median": round(median(ratios), 6), "min": round(min(ratios), 6), "max": round(max(ratios), 6),
            "pairs": len(ratios)}


def pair_order(i: int) -> tuple[int, int]:
    """Order of the two sides in pair ``i``: (0, 1) for even i, (1, 0) for odd i, so that drift between the first
    and the second run of a pair does not land on one side only."""
    return (0, 1) if i % 2 == 0 else (1, 0)


def interleaved_pairs(measure: Sequence[Callable[[int], float]], pairs: int) -> list[tuple[float, float]]:
    """Run two measurements in ``pairs`` interleaved pairs (A then B, then B then A, ...).

    Args:
        measure: two callables; ``measure[k](i)`` runs side k for pair i and returns its time (any unit).
        pairs: number of pairs (>= 1).

    Returns:
        per pair (time of A, time of B).
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    out: list[tuple[float, float]] = []
    for i in range(pairs):
        t: list[float] = [0.0, 0.0]
        for side in pair_order(i):
            t[side] = float(measure[side](i))
        out.append((t[0], t[1]))
    return out


def synchronize() -> None:
    """``torch.cuda.synchronize()`` when CUDA is initialised (wall-clock timings then include queued GPU work)."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def wall_time(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn()`` between two device synchronisations; returns (its result, seconds of wall clock)."""
    synchronize()
    t0 = time.perf_counter()
    r = fn()
    synchronize()
    return r, time.perf_counter() - t0


def event_time_us(fn: Callable[[], Any], iters: int = 50, warmup: int = 5) -> float:
    """Median device time of one ``fn()`` in microseconds, each call between two CUDA events.

    Includes launch gaps inside ``fn``; for kernels shorter than the launch overhead use :func:`graph_time_us`.
    Raises RuntimeError without CUDA.
    """
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("event_time_us needs CUDA")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return median(times)


def capture_graph(fn: Callable[[], Any], calls: int, warmup: int = 3) -> Any:
    """A ``torch.cuda.CUDAGraph`` of ``calls`` back-to-back ``fn()`` calls, captured after ``warmup`` calls on a side
    stream (which compile and allocate what the capture must not); the device is synchronized before the capture."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def graph_time_us(fn: Callable[[], Any], calls_per_graph: int = 20, replays: int = 20, warmup: int = 3) -> float:
    """Median time of one ``fn()`` in microseconds, from replays of a CUDA graph that holds ``calls_per_graph``
    back-to-back calls (the host's launch cost is out of the measurement, as in the engine's decode graphs).

    ``fn`` must be capturable (no host synchronisation, static shapes). Raises RuntimeError without CUDA.
    """
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("graph_time_us needs CUDA")
    g = capture_graph(fn, calls_per_graph, warmup)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls_per_graph)
    del g
    return median(times)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth of CUDA device 0.

    A ``nbytes`` uint8 buffer is copied into another ``iters`` times (after 0.25 s of untimed copies), each copy timed
    between CUDA events; bandwidth = 2 * nbytes (read + written) / median time.

    Returns:
        dict: bytes_per_s, tb_s (bytes_per_s / 1e12), nbytes, iters.

    Raises:
        RuntimeError: no CUDA device.
    """
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("copy_bandwidth needs CUDA")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    # a quarter of a second of copies first: with only a few, one H100 gave 2.57 TB/s in a process that had just
    # started and 3.01 TB/s in one whose engines had run (the figure the GPU holds while it works)
    t_end = time.perf_counter() + 0.25
    while time.perf_counter() < t_end:
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()
    t_us = event_time_us(lambda: dst.copy_(src), iters=iters, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    bps = 2 * nbytes / (t_us * 1e-6)
    return {"bytes_per_s": bps, "tb_s": round(bps / 1e12, 4), "nbytes": nbytes, "iters": iters}
