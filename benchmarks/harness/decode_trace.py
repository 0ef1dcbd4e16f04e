"""Trace collection of a profiled decode step: ``record_function`` ranges around the engine's per-step methods
while profiling, and parsing the Chrome trace ``torch.profiler`` writes into steps, each holding the GPU
activities it launched and the engine phase that launched them (used by :mod:`.profile_decode`)."""
from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PHASES: list[str] = ["schedule", "prepare_decode", "run_model", "sampler", "prepare_sample", "postprocess"]
STEP_RANGE = "pd::step"
WARMUP_RANGE = "pd::warmup"


@contextmanager
def annotate_engine(engine: Any) -> Iterator[list[str]]:
    """Wrap the engine's per-step methods in ``record_function`` ranges named ``pd::<phase>`` while inside.

    The wrappers are instance attributes that shadow the class methods; they are deleted on exit. Methods that
    do not exist (another runner class, e.g. tensor parallel) are skipped.

    Yields:
        the phases that were wrapped.
    """
    from torch.profiler import record_function

    runner = engine.model_runner
    targets: list[tuple[Any, str, str]] = [
        (engine.scheduler, "schedule", "schedule"), (engine.scheduler, "postprocess", "postprocess"),
        (runner, "prepare_decode", "prepare_decode"), (runner, "prepare_sample", "prepare_sample"),
        (runner, "run_model", "run_model"), (getattr(runner, "sampler", None), "forward", "sampler")]
    patched: list[tuple[Any, str]] = []

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def inner(*a: Any, **kw: Any) -> Any:
            with record_function(f"pd::{label}"):
                return fn(*a, **kw)
        return inner

    try:
        for obj, attr, label in targets:
            fn = getattr(obj, attr, None) if obj is not None else None
            if callable(fn) and attr not in vars(obj):
                setattr(obj, attr, wrap(fn, label))
                patched.append((obj, attr))
        yield [label for obj, attr, label in targets if any(o is obj and a == attr for o, a in patched)]
    finally:
        for obj, attr in patched:
            delattr(obj, attr)


@dataclass
class Interval:
    """A host range of the trace (microseconds, trace clock)."""

    name: str
    start: float
    end: float


@dataclass
class StepProfile:
    """GPU activities of one profiled step."""

    host: Interval
    activities: list[tuple[str, str, float, float, str | None]] = field(default_factory=list)
    # (name, trace category, start us, duration us, phase)


def _innermost(intervals: list[Interval], starts: list[float], t: float) -> Interval | None:
    """The shortest interval containing ``t`` (intervals sorted by start, ``starts`` their start times)."""
    best: Interval | None = None
    for iv in intervals[:bisect.bisect_right(starts, t)]:
        if iv.start <= t <= iv.end and (best is None or iv.end - iv.start < best.end - best.start):
            best = iv
    return best


def parse_trace(path: str) -> tuple[list[StepProfile], dict[str, float], int]:
    """Read a Chrome trace written by ``torch.profiler`` and assign every GPU activity to a step and a phase.

    Returns:
        (steps in order, {phase: host ms per step, plus ``step`` and ``rest_incl_gpu_wait``}, number of GPU
        activities whose launching host call was not found, placed by their own start time).
    """
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    steps: list[Interval] = []
    phases: list[Interval] = []
    launch_ts: dict[int, float] = {}
    device: list[dict[str, Any]] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = str(e.get("cat", "")).lower(), str(e.get("name", ""))
        ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
        if cat == "user_annotation":  # record_function ranges on the host ("gpu_user_annotation" is their copy)
            if name == STEP_RANGE:
                steps.append(Interval(name, ts, ts + dur))
            elif name.startswith("pd::") and name != WARMUP_RANGE:
                phases.append(Interval(name[4:], ts, ts + dur))
        elif "runtime" in cat or "driver" in cat:  # cuda_runtime / cuda_driver (older kineto: "Runtime")
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launch_ts[int(corr)] = ts
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset", "memcpy", "memset"):
            device.append(e)
    steps.sort(key=lambda iv: iv.start)
    phases.sort(key=lambda iv: iv.start)
    step_starts = [s.start for s in steps]
    phase_starts = [p.start for p in phases]
    out = [StepProfile(host=s) for s in steps]
    unmatched = 0
    for e in device:
        ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
        corr = (e.get("args") or {}).get("correlation")
        host_t = launch_ts.get(int(corr)) if corr is not None else None
        t = host_t if host_t is not None else ts
        if host_t is None:
            unmatched += 1
        i = bisect.bisect_right(step_starts, t) - 1
        if i < 0 or t > steps[i].end:
            continue  # the discarded warm-up step, or outside every step
        ph = _innermost(phases, phase_starts, host_t) if host_t is not None else None
        out[i].activities.append((str(e.get("name", "")), str(e.get("cat", "")), ts, dur,
                                  ph.name if ph is not None else None))
    n = max(len(steps), 1)
    phase_ms: dict[str, float] = defaultdict(float)
    for p in phases:
        i = bisect.bisect_right(step_starts, p.start) - 1
        if 0 <= i and p.end <= steps[i].end:
            phase_ms[p.name] += (p.end - p.start) / 1e3 / n
    inside = sum(phase_ms.values())  # the phases are siblings inside a step (none nests another)
    phase_ms["step"] = sum(s.end - s.start for s in steps) / 1e3 / n
    # the rest of the step: Python glue and the wait for the GPU in ``.tolist()`` of the sampled ids
    phase_ms["rest_incl_gpu_wait"] = phase_ms["step"] - inside
    return out, dict(phase_ms), unmatched
