"""Where the time of a decode step goes, against its roofline (torch.profiler over the engine's own steps).

Method. For each engine mode (one ``LLM`` per mode, reused for every batch size, released before the next mode):

- ``fusion``:   compile_fusion=True,  enforce_eager=False (coconut backend + CUDA graphs)
- ``nofusion``: compile_fusion=False, enforce_eager=False (Inductor + CUDA graphs)

and each batch size B, B requests of ``--prompt-len`` random token ids (temperature ``--temperature``,
``ignore_eos=True``, ``max_tokens`` large enough that none finishes while measured) are added through the engine
(``llm.engine.add_request``) and ``LLMEngine.step()`` is called until every prompt is prefilled and one decode step
has run. Then:

1. ``--warmup-steps`` untimed decode steps;
2. ``--steps`` decode steps timed with ``time.perf_counter()`` around each ``step()``, without the profiler
   (every step ends in ``.tolist()`` of the sampled ids, which waits for the GPU, so this is the real step time);
3. ``--steps`` more decode steps (plus one discarded warm-up step) under ``torch.profiler`` with CPU and CUDA
   activities. Each step is wrapped in a ``record_function`` range, and so are, by patching the engine
   objects' methods for the duration of the profile only, the scheduler's ``schedule``/``postprocess``, the model
   runner's ``prepare_decode``/``prepare_sample``/``run_model`` and the sampler's ``forward``.

The profile is exported as a Chrome trace and parsed: each GPU activity (kernel, memcpy, memset; the kernels of
CUDA-graph replays included) is tied to the host call that launched it by its CUPTI correlation id, and through
that call's timestamp to a step and a phase (a kernel whose launch is not found is placed by its own start time,
which is valid because each step waits for the GPU before it returns). Kernels are put into categories by name:

- ``fused_norm_linear``: fusion_pass's Triton kernels (``_fused_*``, ``_rms_norm_kernel``; not ``triton_*``)
- ``gemm``: cuBLAS / CUTLASS (gemm, gemv, cutlass, xmma, nvjet, splitKreduce, cublas)
- ``attention``: ``_decode_split_kernel``, ``_decode_reduce_kernel``, ``_prefill_kernel``
- ``kv_store``: ``_store_kvcache*``
- ``inductor``: Inductor-generated kernels (names starting ``triton_``: norms, RoPE, SiLU*mul, residual adds), and
  ``_qk_norm_rope_kernel``, which replaces the q/k norm + RoPE ones on the GPU
- ``sampler``: every kernel launched inside ``Sampler.forward``, else by name (softmax, argmax, exponential, ...)
- ``memcpy``: memcpy / memset activities and copy / fill kernels (the host-to-device inputs, the graph's static
  input staging, the ``.tolist()`` read-back)
- ``other``: the rest.

Per step (means over the profiled steps): ``wall_ms`` (median of the unprofiled step times), ``gpu_kernel_ms``
(sum of the durations of every GPU activity), ``gpu_busy_ms`` (length of the union of their intervals, i.e. time
the GPU was doing anything), ``host_ms = wall_ms - gpu_busy_ms``: an ESTIMATE of the step time the GPU spends
idle waiting for the host (scheduling, input preparation, launches, Python); it is not the host's CPU time, which
overlaps the GPU's work. Per category: ms per step and kernels per step; the top ``--top-kernels`` kernels by time.
Host phase times (``host_phases_ms``) come from the profiled steps and include the profiler's own overhead.

Roofline (bytes floor at the bandwidth ``floors.bandwidth_bytes_per_s()`` = 4.3e12 B/s, and a compute floor
at ``floors.PEAK_BF16_FLOP_PER_S``; floor = the larger), computed from the checkpoint's config.json and the
engine's dtype, per group of categories:

- ``linear`` (fused_norm_linear + gemm; the fusion pass's dispatcher decides per batch size whether a site's
  weights are read by a fused Triton kernel or by cuBLAS, so only their sum has a clean floor): every weight of
  every linear read once, per layer qkv ``(H + 2 KVH) * D x hidden``, o_proj ``hidden x H * D``, gate_up
  ``2 * inter x hidden``, down ``hidden x inter``, times the layers, plus lm_head ``vocab x hidden``, plus each
  linear's input and output activations; FLOPs ``2 * B * params``.
- ``attention``: K and V of every live token of every sequence (context length incl. the new token) over all
  layers (114,688 bytes per token for Qwen3-0.6B in bf16), plus q read and the output written.
- ``kv_store``: the new tokens' K and V, read once and written once (``2 * B * kv bytes per token``).
- ``sampler``: the logits read once (``B * vocab * dtype bytes``).
- ``step``: the sum of the above; its fraction is taken against wall time and against GPU busy time.

``fraction_of_floor`` = floor_ms / achieved_ms (1.0 = at the roofline). Inductor elementwise, memcpy and other
kernels get no floor (their bytes are tiny; they are launch- and latency-bound).

Units: milliseconds per decode step unless a key says otherwise (``_us``: microseconds, ``bytes``), counts per step.

Writes ``--out`` (benchmarks/profile.py merges it into results/<gpu>/profile.json), after
every (mode, batch) case, so a run cut short keeps what it measured; prints tables.

Usage::

    python benchmarks/profile.py --what decode --model /tmp/qwen3-0.6b
    python benchmarks/profile.py --what decode --model /tmp/tinyck --part-args 'decode=--batches 1,2 --steps 3'
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import accelerator, engine_modes, floors, provenance, results_io, tables, timing, workloads  # noqa: E402

provenance.add_repo_to_path()

MODES: dict[str, dict[str, Any]] = engine_modes.ENGINE_MODES
DEFAULT_CKPT = "/tmp/qwen3-0.6b"

CATEGORIES: list[str] = ["fused_norm_linear", "gemm", "attention", "kv_store", "inductor", "sampler", "memcpy",
                         "other"]
# roofline groups: the categories whose kernels do the work the floor counts
GROUPS: dict[str, list[str]] = {
    "linear": ["fused_norm_linear", "gemm"],
    "attention": ["attention"],
    "kv_store": ["kv_store"],
    "sampler": ["sampler"],
}
PHASES: list[str] = ["schedule", "prepare_decode", "run_model", "sampler", "prepare_sample", "postprocess"]
STEP_RANGE = "pd::step"
WARMUP_RANGE = "pd::warmup"

_GEMM_RE = re.compile(r"gemm|gemv|cutlass|xmma|nvjet|splitkreduce|cublas|s16816|s1688|wgmma", re.IGNORECASE)
_SAMPLER_RE = re.compile(r"softmax|argmax|argmin|exponential|distribution|philox|curand|reduce_kernel|sort|"
                         r"cumsum|scan", re.IGNORECASE)
_COPY_RE = re.compile(r"memcpy|memset|direct_copy|copy_kernel|fillfunctor|fill_kernel", re.IGNORECASE)


def categorize(name: str, activity: str = "kernel", phase: str | None = None) -> str:
    """The category of one GPU activity.

    Args:
        name: the kernel name as CUPTI reports it (demangled for C++ kernels, the function name for Triton ones).
        activity: the trace category: "kernel", "gpu_memcpy" or "gpu_memset".
        phase: the engine phase that launched it (see :data:`PHASES`) when known.

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


# ------------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=None,
                    help=f"checkpoint folder (default: {DEFAULT_CKPT}, built with "
                         "scripts/make_qwen3_06b_checkpoint.py when missing)")
    ap.add_argument("--modes", default="fusion,nofusion", help=f"comma list of {sorted(MODES)}")
    ap.add_argument("--batches", default="1,64,256", help="comma list of decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed, and then profiled, per case")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps before timing")
    ap.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (the sampler is one argmax)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no new (mode, batch) case starts once this many seconds have passed since the start; "
                         "the JSON then holds the cases done")
    ap.add_argument("--top-kernels", type=int, default=15)
    ap.add_argument("--trace-dir", default=None,
                    help="keep each case's Chrome trace here (trace-<mode>-b<B>.json; default: deleted)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: a file in the temp folder; "
                         "elsewhere a file in the temp folder, so CPU test runs never overwrite GPU results)")
    args = ap.parse_args(argv)
    args.out = args.out or results_io.default_out("decode-profile")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def ensure_checkpoint(model: str | None) -> str:
    """The checkpoint folder to use: ``model`` as given, or :data:`DEFAULT_CKPT`, built when it has no weights.

    Raises:
        SystemExit: ``model`` was given and holds no config.json, or building the default checkpoint failed.
    """
    if model:
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SystemExit(f"--model {model}: no config.json there")
        return model
    path = DEFAULT_CKPT
    has_weights = os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))
    if os.path.isfile(os.path.join(path, "config.json")) and has_weights:
        return path
    script = os.path.join(provenance.REPO_ROOT, "scripts", "make_qwen3_06b_checkpoint.py")
    print(f"building the Qwen3-0.6B-shaped checkpoint at {path}", flush=True)
    r = subprocess.run([sys.executable, script, "--out", path])
    if r.returncode != 0:
        raise SystemExit(f"{script} --out {path} failed (exit {r.returncode})")
    return path


# ------------------------------------------------------------------------------------------- roofline
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


# ------------------------------------------------------------------------------------------- annotations
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


# ------------------------------------------------------------------------------------------- trace parsing
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


# ------------------------------------------------------------------------------------------- engine driving
def _decode_batch(engine: Any, prompts: list[list[int]], params: Any) -> list[Any]:
    """Add the requests and step until every prompt is prefilled and a decode step of all of them has run.

    Raises:
        RuntimeError: a request finished early, or the decode batch is not all the requests.
    """
    for i, ids in enumerate(prompts):
        engine.validate(i, ids, params)
    seqs = [engine.add_request(ids, params) for ids in prompts]
    sched = engine.scheduler
    for _ in range(10_000):
        finished, is_prefill, tokens = engine.step()
        if finished:
            raise RuntimeError(f"{len(finished)} request(s) finished during prefill")
        if not is_prefill and not sched.waiting:
            if tokens != len(prompts) or len(sched.running) != len(prompts):
                raise RuntimeError(f"decode step of {tokens} sequences ({len(sched.running)} running) for "
                                   f"{len(prompts)} requests: raise --max-num-seqs or the KV pool")
            return seqs
    raise RuntimeError("prefill did not end within 10,000 steps")


def _timed_step(engine: Any, expect: int) -> float:
    """One decode step; its wall seconds. Raises RuntimeError if it was not a decode step of ``expect`` sequences."""
    accelerator.synchronize()
    t0 = time.perf_counter()
    finished, is_prefill, tokens = engine.step()
    accelerator.synchronize()  # the step already waits for the sampled ids; this is a no-op safeguard
    dt = time.perf_counter() - t0
    if is_prefill or finished or tokens != expect:
        raise RuntimeError(f"expected a decode step of {expect} sequences, got is_prefill={is_prefill}, "
                           f"{tokens} tokens, {len(finished)} finished")
    return dt


def profile_case(llm: Any, mode: str, batch: int, args: argparse.Namespace, shape: ModelShape) -> dict[str, Any]:
    """Put ``batch`` sequences into decode, time and profile ``args.steps`` steps, and aggregate (see module doc)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from nanovllm import SamplingParams

    engine = llm.engine
    high = min(10000, shape.vocab - 1)
    prompts = workloads.random_prompts(batch, args.prompt_len, seed=args.seed * 1_000_003 + 77_000 + batch, high=high)
    max_tokens = args.warmup_steps + 2 * args.steps + 8
    params = SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=max_tokens)
    res: dict[str, Any] = {"mode": mode, "batch": batch}
    try:
        seqs = _decode_batch(engine, prompts, params)
        for _ in range(args.warmup_steps):
            _timed_step(engine, batch)
        walls = [_timed_step(engine, batch) for _ in range(args.steps)]

        activities = [ProfilerActivity.CPU]
        cuda = torch.cuda.is_available() and llm.config.device == "cuda"
        if cuda:
            activities.append(ProfilerActivity.CUDA)
        live: list[int] = []
        prof_walls: list[float] = []
        with annotate_engine(engine) as wrapped, profile(activities=activities) as prof:
            with record_function(WARMUP_RANGE):
                _timed_step(engine, batch)
            for _ in range(args.steps):
                # this step's context: every token so far, the fed one (its K/V is written in this step) included
                live.append(sum(len(s) for s in seqs))
                with record_function(STEP_RANGE):
                    prof_walls.append(_timed_step(engine, batch))
        fd, trace = tempfile.mkstemp(prefix=f"decode-profile-{mode}-b{batch}-", suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(trace)
            steps, phase_ms, unmatched = parse_trace(trace)
            if args.trace_dir:
                os.makedirs(args.trace_dir, exist_ok=True)
                dst = os.path.join(args.trace_dir, f"trace-{mode}-b{batch}.json")
                shutil.move(trace, dst)
                res["trace"] = dst
        finally:
            if os.path.exists(trace):
                os.remove(trace)
    finally:
        engine.scheduler.abort_all()  # frees the blocks; the engine is reused for the next batch size

    if len(steps) != args.steps:
        raise RuntimeError(f"trace holds {len(steps)} '{STEP_RANGE}' ranges for {args.steps} profiled steps")
    agg = aggregate(steps, args.top_kernels)
    wall_ms = timing.median(walls) * 1e3
    wall_prof_ms = timing.median(prof_walls) * 1e3
    live_mean = sum(live) / len(live)
    roof = roofline(shape, batch, live_mean, floors.bandwidth_bytes_per_s(), floors.PEAK_BF16_FLOP_PER_S)
    groups: dict[str, Any] = {}
    for g, cats in list(GROUPS.items()) + [("step", CATEGORIES)]:
        achieved = sum(agg["categories"][c]["ms"] for c in cats)
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
    groups["step"]["fraction_of_floor_vs_gpu_busy"] = (round(roof["step"]["floor_ms"] / agg["gpu_busy_ms"], 4)
                                                       if agg["gpu_busy_ms"] > 0 else None)
    cat_floor = {c: g for g, cs in GROUPS.items() for c in cs}
    for c, v in agg["categories"].items():
        g = cat_floor.get(c)
        v["floor_group"] = g
        v["floor_ms"] = groups[g]["floor_ms"] if g and len(GROUPS[g]) == 1 else None
        v["fraction_of_floor"] = (round(groups[g]["floor_ms"] / v["ms"], 4)
                                  if g and len(GROUPS[g]) == 1 and v["ms"] > 0 else None)
    host_ms = wall_ms - agg["gpu_busy_ms"]
    graphs = getattr(engine.model_runner, "graphs", None)  # DecodeGraphs (engine/cuda_graphs.py)
    res.update({
        "steps": args.steps,
        "context_tokens_mean": round(live_mean / batch, 1),
        "graph_size": (graphs.padded_rows(batch) if graphs is not None and graphs.padded_rows(batch) in graphs
                       else None),
        "wall_ms": round(wall_ms, 5),
        "wall_ms_mean": round(sum(walls) / len(walls) * 1e3, 5),
        "wall_ms_profiled": round(wall_prof_ms, 5),
        "per_step_wall_ms": [round(w * 1e3, 5) for w in walls],
        "gpu_kernel_ms": agg["gpu_kernel_ms"],
        "gpu_busy_ms": agg["gpu_busy_ms"],
        "host_ms": round(host_ms, 5),
        "host_ms_profiled": round(wall_prof_ms - agg["gpu_busy_ms"], 5),
        "host_share": round(host_ms / wall_ms, 4) if wall_ms > 0 else None,
        "kernels": agg["kernels"],
        "categories": agg["categories"],
        "roofline": groups,
        "floor_ms": groups["step"]["floor_ms"],
        "fraction_of_floor": groups["step"]["fraction_of_floor"],
        "gpu_ms_by_launching_phase": agg["gpu_ms_by_launching_phase"],
        "host_phases_ms": {p: round(v, 5) for p, v in phase_ms.items()},
        "host_phases_wrapped": wrapped,
        "top_kernels": agg["top_kernels"],
        "per_step_gpu_busy_ms": agg["per_step_gpu_busy_ms"],
        "unattributed_activities": unmatched,
        "cuda_activity": cuda,
    })
    return res


def llm_kwargs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Keyword arguments of ``LLM(model, **kwargs)`` for one mode."""
    return engine_modes.engine_kwargs(args, mode, args.max_num_seqs)


def run_mode(mode: str, batches: list[int], args: argparse.Namespace, shape_of: Callable[[Any], ModelShape],
             deadline: float, on_case: Callable[[dict[str, Any]], None], llm: Any = None,
             engine_kwargs: dict[str, Any] | None = None, init_s: float | None = None) -> dict[str, Any]:
    """Build one engine for ``mode``, profile every batch size (until ``deadline``), release the engine.

    Args:
        llm: a prebuilt engine of this ``mode`` (its max_num_seqs should be ``args.max_num_seqs``: larger batches
            are skipped); when given, it is neither built nor shut down here, ``engine_kwargs`` (the keywords it
            was built with) are recorded in ``engine_config``, ``init_s`` is the caller's build time of that engine
            (None if not given; the build is shared with the caller's other measurements) and ``prebuilt_engine``
            is True.
    """
    llm, kw, res, own = engine_modes.mode_engine(mode, args.model, "decode profile", lambda: llm_kwargs(args, mode), llm,
                                                 engine_kwargs, init_s, batches={}, skipped=[])
    try:
        res["engine_config"] = engine_modes.engine_config(llm, kw)
        shape = shape_of(llm)
        for b in batches:
            if time.perf_counter() > deadline:
                print(f"[{mode}] batch {b}: skipped (--budget-s {args.budget_s} passed)", flush=True)
                res["skipped"].append(b)
                continue
            if b > args.max_num_seqs:
                print(f"[{mode}] batch {b}: skipped (> --max-num-seqs {args.max_num_seqs})", flush=True)
                res["skipped"].append(b)
                continue
            t1 = time.perf_counter()
            try:
                case = profile_case(llm, mode, b, args, shape)
            except Exception as e:  # noqa: BLE001 - keep going with the other batch sizes
                import traceback
                traceback.print_exc()
                case = {"mode": mode, "batch": b, "error": f"{type(e).__name__}: {e}"}
            case["case_s"] = round(time.perf_counter() - t1, 1)
            res["batches"][str(b)] = case
            if "error" not in case:
                print(f"[{mode}] batch {b:4d}: wall {case['wall_ms']:.3f} ms, GPU busy {case['gpu_busy_ms']:.3f} ms, "
                      f"host~{case['host_ms']:.3f} ms, {case['kernels']:.0f} kernels, floor {case['floor_ms']:.3f} ms "
                      f"({case['case_s']} s)", flush=True)
            on_case(res)
    finally:
        if own:
            engine_modes.shutdown_engine(llm)
            del llm
            accelerator.free_accelerator_memory(report=True)
    return res


# ------------------------------------------------------------------------------------------- report
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


def shape_getter(hf: dict[str, Any], store: dict[str, Any]) -> Callable[[Any], ModelShape]:
    """``shape_of(llm)``: the :class:`ModelShape` of config.json ``hf`` at the engine's element size; it also puts
    its description under ``store["model_shape"]`` (merged into the result JSON)."""
    def shape_of(llm: Any) -> ModelShape:
        itemsize = int(getattr(llm.config.torch_dtype, "itemsize", 2))
        s = ModelShape.from_hf(hf, itemsize)
        store["model_shape"] = s.describe()
        return s
    return shape_of


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


def main(argv: list[str] | None = None) -> int:
    """Profile every (mode, batch), write the JSON after each case, print the tables."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {sorted(MODES)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.model = ensure_checkpoint(args.model)
    shapes: dict[str, Any] = {}
    shape_of = shape_getter(floors.load_hf_config(args.model), shapes)
    result = new_result(args, batches)
    deadline = t_start + args.budget_s
    failures: list[str] = []
    path = ""

    def save(mode_res: dict[str, Any] | None = None) -> None:
        nonlocal path
        if mode_res is not None:
            result["modes"][mode_res["mode"]] = mode_res
        result.update(shapes)
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        path = results_io.write_json(args.out, result)

    for mode in modes:
        if time.perf_counter() > deadline:
            print(f"mode {mode}: skipped (--budget-s {args.budget_s} passed)", flush=True)
            result["modes"][mode] = skipped_mode(mode, batches, "not built: --budget-s passed")
            save()
            continue
        try:
            save(run_mode(mode, batches, args, shape_of, deadline, save))
        except Exception as e:  # noqa: BLE001 - keep going with the other modes
            import traceback
            traceback.print_exc()
            save({"mode": mode, "error": f"{type(e).__name__}: {e}", "batches": {}})
            failures.append(mode)
            accelerator.free_accelerator_memory()
        failures += [f"{mode}/B={b}" for b, c in result["modes"][mode].get("batches", {}).items() if "error" in c]
    save()
    print_report(result)
    print(f"total {result['total_s']} s; wrote {path}")
    if failures:
        print(f"FAILED: {failures}")
    return 1 if failures else 0

