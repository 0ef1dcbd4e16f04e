"""Where the offline workload's time goes: torch.profiler over one whole run of the throughput workload.

Method. Per engine mode (``fusion``, ``nofusion``; one ``LLM`` per mode, built with the keywords of
``benchmarks/throughput.py``), the workload of :func:`.workloads.nano_vllm_workload` (256 requests, temperature 0.6,
``ignore_eos``) runs once unprofiled (run 1: warm-up and the reference wall time) and once under ``torch.profiler``
with CPU and CUDA activities (run 2, with other first token ids so that no prefix-cache block of run 1 matches).
Every ``engine.step()`` of run 2 is wrapped in a ``record_function`` range, and the GPU activities (the kernels of
CUDA-graph replays included) are tied to their step through the correlation id of their launch
(:func:`.decode_trace.parse_trace`). Each step is a prefill step or a decode round (``num_scheduler_steps`` model
steps); decode rounds are grouped by batch size (rows in the round). The engines run one round at a time
(``async_scheduling=False``): with async scheduling a step launches the round after the one it reports, so its
kernels would land in the wrong step; the GPU's idle time between rounds measured here is what async scheduling
overlaps with the device's work.

Per group: ``wall_s`` (the steps' host ranges, each ending in the read-back of the sampled ids, so it includes the
wait for the GPU), ``gpu_busy_s`` (the union of the GPU activities' intervals), ``idle_s = wall_s - gpu_busy_s``
(the GPU waiting for the host; the profiler's own host overhead inflates it, compare ``wall_s`` with run 1), seconds
per kernel category (:func:`.decode_kernels.categorize`) and the bytes floors: ``weights_floor_s`` (every weight read
once per model step) and ``kv_floor_s`` (the K/V of every live token read once per model step), at the copy
bandwidth measured in the same process (:func:`.floors.bandwidth_bytes_per_s`). ``attention_over_kv_floor`` is the
attention kernels' time over the K/V floor; ``linear_over_weights_floor`` is the linear kernels' (fused norm+linear
and cuBLAS) time over the weights' floor.

Writes ``--out`` (default ``benchmarks/results/<gpu>/workload-profile.json``) after each mode and prints a table.

Usage::

    python -m benchmarks.harness.profile_workload --model /tmp/qwen3-0.6b
    python -m benchmarks.harness.profile_workload --model /tmp/tiny --modes eager --num-seqs 4 --max-input-len 40 \
        --max-output-len 20 --min-input-len 8 --min-output-len 8 --device cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

from . import engine, floors, provenance, results_io, workloads
from .decode_kernels import CATEGORIES, _union_us, categorize
from .decode_trace import STEP_RANGE, parse_trace

BUCKETS: list[tuple[int, int]] = [(1, 8), (9, 32), (33, 64), (65, 128), (129, 256), (257, 4096)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (scripts/make_qwen3_06b_checkpoint.py)")
    ap.add_argument("--modes", default="fusion,nofusion", help=f"comma list of {sorted(engine.MODES)}")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--min-input-len", type=int, default=100)
    ap.add_argument("--min-output-len", type=int, default=100)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-scheduler-steps", type=int, default=None)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--top-kernels", type=int, default=12)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>/workload-profile.json)")
    return ap.parse_args(argv)


def bucket_of(rows: int) -> str:
    """The label of the batch-size group of a decode round with ``rows`` sequences."""
    for lo, hi in BUCKETS:
        if lo <= rows <= hi:
            return f"{lo}-{hi}"
    return f">{BUCKETS[-1][1]}"


class StepLog:
    """Wraps ``engine.step`` in :data:`STEP_RANGE` ranges and records, per step, what it ran: prefill or decode,
    the rows, the model steps and the live tokens (the K/V every model step reads)."""

    def __init__(self, eng: Any) -> None:
        self.eng = eng
        self.steps: list[dict[str, Any]] = []

    def __enter__(self) -> StepLog:
        from torch.profiler import record_function

        eng, inner = self.eng, self.eng.step

        def step() -> Any:
            running = list(eng.scheduler.running)
            live = sum(len(s) for s in running)
            with record_function(STEP_RANGE):
                out = inner()
            k = int(getattr(eng, "last_num_steps", 1))
            self.steps.append({"prefill": bool(out[1]), "rows": len(running), "model_steps": k,
                               # K/V read over the round: model step j (from 0) reads every live token and j more
                               # per row (``len(seq)`` already counts the token the round's first step feeds)
                               "live_token_steps": k * live + len(running) * k * (k - 1) // 2})
            return out

        eng.step = step
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.eng.step


def summarize(steps: list[Any], log: list[dict[str, Any]], sizes: dict[str, float], bw: float, top_n: int
              ) -> dict[str, Any]:
    """Group the profiled steps (prefill / decode by batch size) and total their time, categories and floors."""
    groups: dict[str, dict[str, Any]] = {}
    kernels: dict[str, list[Any]] = {}
    for st, info in zip(steps, log):
        key = "prefill" if info["prefill"] else f"decode {bucket_of(info['rows'])}"
        g = groups.setdefault(key, {"steps": 0, "model_steps": 0, "wall_s": 0.0, "gpu_busy_s": 0.0,
                                    "categories_s": defaultdict(float), "live_token_steps": 0})
        g["steps"] += 1
        g["model_steps"] += info["model_steps"]
        g["live_token_steps"] += info["live_token_steps"]
        g["wall_s"] += (st.host.end - st.host.start) / 1e6
        g["gpu_busy_s"] += _union_us([(a[2], a[3]) for a in st.activities]) / 1e6
        for name, act, _ts, dur, phase in st.activities:
            c = categorize(name, act, phase)
            g["categories_s"][c] += dur / 1e6
            if not info["prefill"]:
                k = kernels.setdefault(name, [c, 0, 0.0])
                k[1] += 1
                k[2] += dur / 1e6
    out: dict[str, Any] = {}
    total = {"wall_s": 0.0, "gpu_busy_s": 0.0, "weights_floor_s": 0.0, "kv_floor_s": 0.0,
             "categories_s": defaultdict(float)}
    for key in sorted(groups, key=lambda k: (k != "prefill", int(k.split()[-1].split("-")[0]) if k != "prefill" else 0)):
        g = groups[key]
        cats = {c: round(g["categories_s"].get(c, 0.0), 4) for c in CATEGORIES}
        row: dict[str, Any] = {"steps": g["steps"], "model_steps": g["model_steps"], "wall_s": round(g["wall_s"], 4),
                               "gpu_busy_s": round(g["gpu_busy_s"], 4),
                               "idle_s": round(g["wall_s"] - g["gpu_busy_s"], 4), "categories_s": cats}
        if key != "prefill":
            wf = g["model_steps"] * sizes["weight_bytes"] / bw
            kf = g["live_token_steps"] * sizes["kv_bytes_per_token"] / bw
            lin = cats["fused_norm_linear"] + cats["gemm"]
            row.update({"weights_floor_s": round(wf, 4), "kv_floor_s": round(kf, 4),
                        "floor_over_wall": round((wf + kf) / g["wall_s"], 4) if g["wall_s"] > 0 else None,
                        "attention_over_kv_floor": round(cats["attention"] / kf, 3) if kf > 0 else None,
                        "linear_over_weights_floor": round(lin / wf, 3) if wf > 0 else None})
            total["weights_floor_s"] += wf
            total["kv_floor_s"] += kf
            total["wall_s"] += g["wall_s"]
            total["gpu_busy_s"] += g["gpu_busy_s"]
            for c, v in cats.items():
                total["categories_s"][c] += v
        out[key] = row
    dw = total["wall_s"]
    out["decode"] = {"wall_s": round(dw, 4), "gpu_busy_s": round(total["gpu_busy_s"], 4),
                     "idle_s": round(dw - total["gpu_busy_s"], 4),
                     "categories_s": {c: round(v, 4) for c, v in total["categories_s"].items()},
                     "weights_floor_s": round(total["weights_floor_s"], 4), "kv_floor_s": round(total["kv_floor_s"], 4),
                     "floor_over_wall": round((total["weights_floor_s"] + total["kv_floor_s"]) / dw, 4) if dw else None}
    top = sorted(kernels.items(), key=lambda kv: -kv[1][2])[:top_n]
    out["top_decode_kernels"] = [{"name": n[:160], "category": c, "calls": cnt, "s": round(s, 4),
                                  "us_per_call": round(s / cnt * 1e6, 2)} for n, (c, cnt, s) in top]
    return out


def profile_mode(args: argparse.Namespace, mode: str, bw: float) -> dict[str, Any]:
    """Build ``mode``'s engine, run the workload once plain and once profiled; returns the mode's results."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nanovllm import SamplingParams

    kw = engine.engine_kwargs(mode, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              num_scheduler_steps=args.num_scheduler_steps, device=args.device)
    prompts, max_tokens = workloads.nano_vllm_workload(args.num_seqs, 0, args.max_input_len, args.max_output_len,
                                                       args.min_input_len, args.min_output_len)
    high = engine.prompt_id_high(args.model)
    prompts = [[t % (high + 1) for t in p] for p in prompts]
    sps = [SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
    kw["async_scheduling"] = False  # each step's kernels are then those of the round it reports (see the docstring)
    llm, build_s = engine.build(args.model, kw)
    try:
        plain = engine.run_timed(llm, workloads.shifted(prompts, 1, high), sps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with StepLog(llm.engine) as log, profile(activities=activities) as prof:
            profiled = engine.run_timed(llm, workloads.shifted(prompts, 2, high), sps)
        fd, trace = tempfile.mkstemp(prefix=f"workload-{mode}-", suffix=".json")
        os.close(fd)
        try:
            t0 = time.perf_counter()
            prof.export_chrome_trace(trace)
            steps, _phases, unmatched = parse_trace(trace)
            parse_s = time.perf_counter() - t0
        finally:
            os.remove(trace)
    finally:
        engine.release(llm)
    if len(steps) != len(log.steps):
        raise RuntimeError(f"[{mode}] the trace holds {len(steps)} steps, the engine ran {len(log.steps)}")
    sizes = floors.qwen3_sizes(floors.load_hf_config(args.model))
    n = sum(max_tokens)
    return {"mode": mode, "llm_kwargs": kw, "build_s": round(build_s, 2),
            "run1": {"output_tokens_per_s": round(n / plain.wall_s, 1), "seconds": round(plain.wall_s, 3),
                     "prefill_s": round(plain.prefill_s, 3), "decode_s": round(plain.decode_s, 3)},
            "profiled_run": {"seconds": round(profiled.wall_s, 3), "prefill_s": round(profiled.prefill_s, 3),
                             "decode_s": round(profiled.decode_s, 3)},
            "trace_export_and_parse_s": round(parse_s, 1), "unattributed_activities": unmatched,
            "groups": summarize(steps, log.steps, sizes, bw, args.top_kernels)}


def print_mode(res: dict[str, Any]) -> None:
    """One table per mode: each group's wall, GPU busy, idle, floors and main categories (seconds)."""
    print(f"\n[{res['mode']}] run 1 {res['run1']['seconds']} s ({res['run1']['output_tokens_per_s']} tok/s), profiled "
          f"run {res['profiled_run']['seconds']} s")
    cols = ["attention", "fused_norm_linear", "gemm", "sampler", "inductor", "kv_store", "memcpy", "other"]
    print(f"{'group':>16} {'steps':>6} {'wall':>7} {'busy':>7} {'idle':>6} {'w.floor':>7} {'kv.floor':>8} "
          + " ".join(f"{c[:9]:>9}" for c in cols))
    for key, g in res["groups"].items():
        if key == "top_decode_kernels":
            continue
        c = g["categories_s"]
        print(f"{key:>16} {g.get('steps', ''):>6} {g['wall_s']:7.3f} {g['gpu_busy_s']:7.3f} {g['idle_s']:6.3f} "
              f"{g.get('weights_floor_s', 0):7.3f} {g.get('kv_floor_s', 0):8.3f} "
              + " ".join(f"{c.get(k, 0):9.3f}" for k in cols))
    for k in res["groups"]["top_decode_kernels"]:
        print(f"  {k['s']:7.3f} s {k['calls']:7d} x {k['us_per_call']:8.2f} us  {k['category']:>17}  {k['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    """Profile every mode; writes the JSON after each. Returns 0, or 1 when a mode failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in engine.MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {sorted(engine.MODES)}")
    path = results_io.results_path("workload-profile", args.out)
    bw = floors.bandwidth_bytes_per_s()
    res: dict[str, Any] = {**provenance.header(argv, module="benchmarks.harness.profile_workload"),
                           "copy_bandwidth_tb_s": round(bw / 1e12, 3), "modes": {}}
    failed = 0
    for mode in modes:
        try:
            res["modes"][mode] = profile_mode(args, mode, bw)
            print_mode(res["modes"][mode])
        except Exception as e:  # noqa: BLE001 - keep the other modes
            import traceback
            traceback.print_exc()
            res["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
            failed = 1
        results_io.write_json(path, res)
    print(f"wrote {path}")
    return failed


if __name__ == "__main__":
    provenance.add_repo_to_path()
    sys.exit(main())
