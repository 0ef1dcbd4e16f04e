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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import accelerator, engine_modes, floors, provenance, results_io, timing, workloads  # noqa: E402
from .decode_kernels import aggregate  # noqa: E402
from .decode_report import new_result, print_report, skipped_mode  # noqa: E402
from .decode_roofline import ModelShape, floor_groups, roofline, shape_getter  # noqa: E402
from .decode_trace import STEP_RANGE, WARMUP_RANGE, annotate_engine, parse_trace  # noqa: E402

# This module drives the engine and profiles it; the trace parsing is in decode_trace.py, the kernel categories
# in decode_kernels.py, the floors in decode_roofline.py, the JSON document and the tables in decode_report.py.

provenance.add_repo_to_path()

MODES: dict[str, dict[str, Any]] = engine_modes.ENGINE_MODES
DEFAULT_CKPT = "/tmp/qwen3-0.6b"


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
    groups = floor_groups(roof, agg["categories"], agg["gpu_busy_ms"], wall_ms)
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

