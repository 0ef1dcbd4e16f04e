"""Async scheduling on and off, side by side on one engine: the offline workload's throughput and the batch-1 decode
step, in interleaved pairs.

One engine is built (``--mode fusion`` or ``nofusion``); its ``config.async_scheduling`` is switched between the
runs of a pair (the engine reads it before every round), so both sides share the compiled graphs, the tuning and
the KV pool. Each pair runs the two sides in alternating order (``timing.pair_order``). Per pair:

- throughput: the 256-request workload of benchmarks/throughput.py (temperature 0.6, EOS ignored; prompts shifted
  per run so that the prefix cache serves nothing), output tokens / wall time, with each run's decode seconds,
  host seconds (the engine's ``host_seconds``: host work the GPU waits for) and rounds launched ahead;
- batch 1: one 512-token prompt, 64 output tokens, the mean decode step (decode seconds / decode tokens).

The ratio on / off of each pair, their median, and the floors beside them (the workload's bandwidth floor and the
weights' read time at the copy bandwidth measured in the same run) go to the JSON with the GPU, versions, date,
commit and command.

Usage::

    python -m benchmarks.harness.async_ab --model /tmp/qwen3-0.6b --pairs 3 --out $OUT/h100/async-scheduling.json
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks.harness import engine, floors, provenance, results_io, timing, workloads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring). Exits with status 2 on a bad value."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/qwen3-0.6b", help="checkpoint folder")
    ap.add_argument("--mode", choices=["fusion", "nofusion"], default="fusion")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (on, off) pairs per part")
    ap.add_argument("--num-seqs", type=int, default=256, help="requests of the throughput workload")
    ap.add_argument("--parts", default="throughput,batch1", help="comma list of throughput, batch1")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new pairs after this many seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--num-scheduler-steps", type=int, default=None, help="none: the engine's default")
    ap.add_argument("--max-input-len", type=int, default=1024, help="the workload's longest prompt")
    ap.add_argument("--max-output-len", type=int, default=1024, help="the workload's longest output")
    ap.add_argument("--out", default=results_io.default_out("async-scheduling"))
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from nanovllm import SamplingParams

    args = parse_args(argv)
    t_start = time.perf_counter()
    out: dict[str, Any] = {"meta": provenance.run_metadata(), "mode": args.mode, "model": args.model}
    bw = floors.bandwidth_bytes_per_s()
    sizes = floors.qwen3_sizes(floors.load_hf_config(args.model))
    out["copy_bandwidth_tb_s"] = round(bw / 1e12, 4)
    out["weights_floor_ms"] = round(sizes["weight_bytes"] / bw * 1e3, 5)
    kw = engine.engine_kwargs(args.mode, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=512,
                              max_num_batched_tokens=16384, gpu_memory_utilization=0.9, seed=0, device=args.device,
                              num_scheduler_steps=args.num_scheduler_steps)
    llm, build_s = engine.build(args.model, kw)
    out["build_s"] = round(build_s, 2)
    high = engine.prompt_id_high(args.model)
    parts = args.parts.split(",")

    def run(on: bool, prompts: list[list[int]], params: list[Any]) -> engine.Timed:
        llm.engine.config.async_scheduling = on
        return engine.run_timed(llm, prompts, params)

    def record(name: str, rows: list[dict[str, Any]], value: str, higher_is_better: bool) -> None:
        ratios = [r["on"][value] / r["off"][value] for r in rows]
        out[name] = {"pairs": rows, "ratio_on_over_off": timing.ratio_stats(ratios),
                     "on_median": timing.median([r["on"][value] for r in rows]),
                     "off_median": timing.median([r["off"][value] for r in rows]),
                     "value": value, "higher_is_better": higher_is_better}
        results_io.write_json(args.out, out)

    if "throughput" in parts:
        prompts, max_tokens = workloads.nano_vllm_workload(args.num_seqs, 0, args.max_input_len, args.max_output_len,
                                                           min(100, args.max_input_len), min(100, args.max_output_len))
        prompts = [[t % (high + 1) for t in p] for p in prompts]
        out["throughput_floor"] = floors.bandwidth_floor(
            [len(p) for p in prompts], max_tokens, bandwidth=bw,
            **{k: sizes[k] for k in ("weight_bytes", "kv_bytes_per_token", "flop_per_token")})
        sps = [SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
        run(True, [p[:8] for p in prompts[:16]], sps[:16])  # nothing of a first run left to compile or tune
        rows: list[dict[str, Any]] = []
        for i in range(args.pairs):
            if rows and time.perf_counter() - t_start > args.budget_s:
                break
            row: dict[str, Any] = {}
            for side in timing.pair_order(i):
                on = side == 0
                t = run(on, [[(p[0] + 997 * (2 * i + side + 1)) % (high + 1)] + p[1:] for p in prompts], sps)
                engine.check_counts(t, max_tokens, f"async={on} pair {i}")
                row["on" if on else "off"] = {
                    "output_tokens_per_s": round(sum(max_tokens) / t.wall_s, 1), "seconds": round(t.wall_s, 3),
                    "decode_s": round(t.decode_s, 3), "host_s": round(t.host_s, 3), "rounds": t.decode_rounds,
                    "rounds_ahead": t.rounds_ahead}
            rows.append(row)
            print(f"throughput pair {i}: on {row['on']['output_tokens_per_s']:,.0f} off "
                  f"{row['off']['output_tokens_per_s']:,.0f} tok/s", flush=True)
            record("throughput", rows, "output_tokens_per_s", True)
        out["throughput"]["fraction_of_floor_on"] = round(
            out["throughput"]["on_median"] / out["throughput_floor"]["output_tokens_per_s"], 4)
        results_io.write_json(args.out, out)

    if "batch1" in parts:
        prompt = workloads.random_prompts(1, min(512, args.max_input_len), seed=1, high=high)
        sp = SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=64)
        run(True, prompt, sp)
        rows = []
        for i in range(max(args.pairs, 5)):
            if rows and time.perf_counter() - t_start > args.budget_s:
                break
            row = {}
            for side in timing.pair_order(i):
                on = side == 0
                t = run(on, [[(prompt[0][0] + 31 * (2 * i + side + 1)) % (high + 1)] + prompt[0][1:]], sp)
                row["on" if on else "off"] = {"decode_step_ms": round(t.decode_step_ms(1), 5),
                                              "host_s": round(t.host_s, 5), "rounds_ahead": t.rounds_ahead}
            rows.append(row)
            record("batch1", rows, "decode_step_ms", False)
        b = out["batch1"]
        print(f"batch 1 decode step: on {b['on_median']:.4f} ms, off {b['off_median']:.4f} ms "
              f"(weights floor {out['weights_floor_ms']:.4f} ms)", flush=True)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps({k: v for k, v in out.items() if k in ("throughput", "batch1")}, default=str)[:2000])
    results_io.write_json(args.out, out)
    engine.release(llm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
