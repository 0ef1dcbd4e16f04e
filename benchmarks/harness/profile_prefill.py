"""Where the time of a batch-1 prefill goes (TTFT), coconut against Inductor: host time, launches, GPU time.

Why: a prefill is not a CUDA graph: every kernel is launched from Python, so per-call host costs count there, and
the batch-1 TTFT of a 512-token prompt is host-bound (docs/performance.md).

Modes: ``fusion`` (compile_fusion=True: its prefill steps run the Inductor-compiled model, its decode steps the
coconut one), ``nofusion`` (Inductor).

Method: for each mode, one small engine (``max_num_seqs`` 4, ``max_model_len`` and ``max_num_batched_tokens``
1024, CUDA graphs on; the decode pretune is skipped: a prefill of M = --prompt-len rows has its dispatch decision
measured on first use, in the warm-up), then

1. ``--warmup`` untimed ``generate(max_tokens=1)`` calls on fresh random prompts of ``--prompt-len`` ids;
2. ``--reps`` timed ones (wall time, median) = TTFT;
3. ``--profiled`` more under ``torch.profiler`` (CPU and CUDA): per op or kernel name, self CPU time and device
   time per call of generate, the number of kernel launch calls, and the summed GPU kernel time.

Usage: python benchmarks/profile.py --what prefill --model /tmp/qwen3-0.6b [--part-args 'prefill=--device cpu']
Writes JSON to ``--out`` (default: the temp folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from . import accelerator, engine_modes, floors, provenance, results_io, tables, workloads  # noqa: E402

provenance.add_repo_to_path()

import torch  # noqa: E402

MODES = ("fusion", "nofusion")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/qwen3-0.6b")
    ap.add_argument("--modes", default="fusion,nofusion")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--profiled", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} ({', '.join(MODES)})")
    return args


def _device_us(evt: Any) -> float:
    """An averaged profiler event's total device time in us (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine import model_runner

    # the decode-size pretune is skipped (not what is measured here)
    saved_pretune = getattr(model_runner, "pretune_fusion", None)
    if saved_pretune is not None:
        model_runner.pretune_fusion = lambda *args, **kwargs: None
    try:
        t0 = time.perf_counter()
        kw: dict[str, Any] = dict(compile_fusion=mode != "nofusion", enforce_eager=False, max_num_seqs=4,
                                  max_model_len=1024, max_num_batched_tokens=1024, dtype=args.dtype)
        if args.device:
            kw["device"] = args.device
        if args.device != "cpu":
            kw["gpu_memory_utilization"] = 0.3
        llm = LLM(args.model, **kw)
        build_s = time.perf_counter() - t0
    finally:
        if saved_pretune is not None:
            model_runner.pretune_fusion = saved_pretune
    sp = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    high = int(floors.load_hf_config(args.model)["vocab_size"]) - 1
    seed = [0]

    def once() -> float:
        seed[0] += 1
        prompt = workloads.random_prompts(1, args.prompt_len, seed=1000 + seed[0], high=high)
        accelerator.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        accelerator.synchronize()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        once()
    ttft = [once() * 1e3 for _ in range(args.reps)]
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() and args.device != "cpu":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.profiled):
            once()
    n = max(1, args.profiled)
    events = prof.key_averages()
    rows = [{"name": e.key, "calls": e.count / n, "self_cpu_us": e.self_cpu_time_total / n,
             "device_us": _device_us(e) / n} for e in events]
    launches = sum(r["calls"] for r in rows if r["name"] in LAUNCH_NAMES)
    launch_cpu = sum(r["self_cpu_us"] for r in rows if r["name"] in LAUNCH_NAMES)
    from torch._dynamo.utils import counters

    result = {"mode": mode, "build_s": round(build_s, 1), "ttft_ms": [round(v, 3) for v in ttft],
              "dynamo_graphs_so_far": int(counters["stats"]["unique_graphs"]),  # this process, every engine
              "ttft_ms_median": round(statistics.median(ttft), 3),
              "per_generate": {"kernel_launch_calls": launches, "kernel_launch_cpu_ms": round(launch_cpu / 1e3, 3),
                               "self_cpu_ms": round(sum(r["self_cpu_us"] for r in rows) / 1e3, 3),
                               "device_ms": round(sum(r["device_us"] for r in rows) / 1e3, 3)},
              "top_self_cpu": sorted(rows, key=lambda r: -r["self_cpu_us"])[:args.top],
              "top_device": sorted(rows, key=lambda r: -r["device_us"])[:args.top]}
    engine_modes.shutdown_engine(llm)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (results_io.default_out("prefill-profile") if args.device != "cpu"
                       else os.path.join(tempfile.gettempdir(), "prefill-profile-cpu.json"))
    modes = [profile_mode(m, args) for m in args.modes]
    for r in modes:
        tables.print_table(["op / kernel", "calls", "self CPU us", "device us"],
                           [[x["name"][:60], round(x["calls"], 1), round(x["self_cpu_us"], 1), round(x["device_us"], 1)]
                            for x in r["top_self_cpu"]],
                           title=f"{r['mode']}: TTFT median {r['ttft_ms_median']} ms; per generate "
                                 f"{r['per_generate']} (top by self CPU time)")
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    path = results_io.write_json(out, {"meta": meta, "prompt_len": args.prompt_len, "modes": modes})
    print(f"wrote {path}")
    return 0

