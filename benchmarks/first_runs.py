"""What a fresh engine still compiles in its first runs, and what each run's throughput is.

    python benchmarks/first_runs.py --model /tmp/qwen3-0.6b --out benchmarks/results/h100/first-runs.json   # GPU

Builds one `LLM(model, compile_fusion=...)`, then runs the offline throughput workload (the first `--requests` of
benchmarks/throughput.py's 256 requests, temperature 0.6, EOS ignored) `--runs` times; as in throughput.py, each
run's prompts differ from the others' in their first token, so no run hits the prefix cache of another. During each run it records
every Triton JIT compile (the cache-miss hook ``triton.knobs.runtime.jit_cache_hook``: kernel name and time into
the run), the Dynamo counters that changed (recompiles, graph breaks) and the log records of the ``fusion_pass``
and ``nanovllm`` loggers at INFO (a dispatch measurement logs one). Inductor's own kernels compile inside Dynamo's
compiles, which the counters show. A run that compiles nothing is as fast as the engine gets; the question this
answers is why run 1 is slower than run 2 (docs/performance.md, cold start).

Prints one table row per run and writes JSON: {header (gpu, date, commit, command, versions), "build_s",
"build_phases_s" (the model runner's init_seconds: load, pretune, kv_cache, attention_warm_up, cudagraphs, ...),
"build_jit_compiles", "runs": [{"run", "seconds", "output_tokens_per_s", "jit_compiles": [{"kernel", "at_s"}],
"dynamo_counters", "log_records"}]}.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path[0] = os.path.dirname(HERE)  # the repository root, not benchmarks/ (whose profile.py shadows the stdlib)
elif os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness.provenance import header  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--fusion", type=int, default=1, choices=[0, 1], help="compile_fusion")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.runs < 1 or not 1 <= args.requests <= 256:
        p.error("--runs must be >= 1 and --requests in 1..256")

    import torch
    import triton
    from torch._dynamo.utils import counters

    from benchmarks.harness import engine, workloads
    from benchmarks.harness.workloads import shifted
    from nanovllm import LLM, SamplingParams

    compiles: list[tuple[float, str]] = []

    def on_jit_compile(**kw: Any) -> bool:  # called on a JIT cache miss; False: compile as usual
        compiles.append((time.perf_counter(), str(getattr(kw.get("fn"), "name", kw.get("fn"))).split(".")[-1]))
        return False

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()[:200]}")

    handler = Collect(level=logging.INFO)
    for name in ("fusion_pass", "nanovllm"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    previous_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = on_jit_compile
    try:
        t0 = time.perf_counter()
        llm = LLM(args.model, compile_fusion=bool(args.fusion), max_num_seqs=512, max_num_batched_tokens=16384,
                  gpu_memory_utilization=0.9)
        build_s = time.perf_counter() - t0
        build_compiles = len(compiles)
        phases = getattr(llm.engine.model_runner, "init_seconds", {})  # the build's phases (model runner)
        prompts, outs = workloads.nano_vllm_workload(args.requests)
        high = engine.prompt_id_high(args.model)
        prompts = [[t % (high + 1) for t in p] for p in prompts]
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in outs]
        runs = []
        for run in range(1, args.runs + 1):
            compiles.clear()
            records.clear()
            before = {k: dict(v) for k, v in counters.items()}
            t0 = time.perf_counter()
            llm.generate(shifted(prompts, run - 1, high), params, use_tqdm=False)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            s = time.perf_counter() - t0
            changed = {k: {kk: vv - before.get(k, {}).get(kk, 0) for kk, vv in v.items()
                           if vv != before.get(k, {}).get(kk, 0)} for k, v in counters.items()}
            runs.append({"run": run, "seconds": round(s, 3), "output_tokens_per_s": round(sum(outs) / s, 1),
                         "jit_compiles": [{"kernel": n, "at_s": round(t - t0, 3)} for t, n in compiles],
                         "dynamo_counters": {k: v for k, v in changed.items() if v},
                         "log_records": dict(collections.Counter(records))})
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
    print("| run | seconds | output tok/s | Triton JIT compiles | Dynamo counters changed |")
    print("|---|---|---|---|---|")
    for r in runs:
        kernels = dict(collections.Counter(c["kernel"] for c in r["jit_compiles"]))
        print(f"| {r['run']} | {r['seconds']} | {r['output_tokens_per_s']} | {kernels or 0} | "
              f"{r['dynamo_counters'] or '-'} |")
    print(f"build {build_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}), {build_compiles} Triton "
          "JIT compiles during the build")
    result = {**header(script="benchmarks/first_runs.py"), "model": args.model, "fusion": bool(args.fusion),
              "requests": args.requests, "build_s": round(build_s, 2),
              "build_phases_s": {k: round(v, 2) for k, v in phases.items()}, "build_jit_compiles": build_compiles,
              "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
