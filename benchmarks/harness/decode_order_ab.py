"""Two settings of one engine side by side on the offline workload, in interleaved pairs: the decode batch longest
first against scheduling order (``--compare order``), or async scheduling against rounds one at a time
(``--compare async``).

One engine is built (``--mode fusion`` or ``nofusion``), so both sides share the compiled graphs, the tuning and the
KV pool. ``order``: the scheduler orders each decode batch with :func:`nanovllm.engine.scheduler.decode_order`
(longest sequence first); for the ``batch`` side that function is replaced by the identity (the rows in scheduling
order) for the run. ``async``: the engine's ``config.async_scheduling`` is True on the ``async`` side (each next
decode round planned and launched before the last one is read) and False on the ``sync`` side. Each pair runs the
two sides in alternating order (``timing.pair_order``), the workload of benchmarks/throughput.py (256 requests,
temperature 0.6, EOS ignored, prompts shifted per run so that the prefix cache serves nothing). Per run: output
tokens / wall time, decode seconds, host seconds. The ratio of the sides of each pair (first / second), their
median and the workload's bandwidth floor (at the copy bandwidth measured in the same process) go to the JSON with
the GPU, versions, date, commit and command.

Usage::

    python -m benchmarks.harness.decode_order_ab --model /tmp/qwen3-0.6b --pairs 2 --out $OUT/h100/decode-order.json
    python -m benchmarks.harness.decode_order_ab --compare async --model /tmp/qwen3-0.6b --out $OUT/h100/async-scheduling.json
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.harness import engine, floors, provenance, results_io, timing, workloads

SIDES = {"order": ("longest", "batch"), "async": ("async", "sync")}  # per comparison: (first side, second side)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring). Exits with status 2 on a bad value."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/qwen3-0.6b", help="checkpoint folder")
    ap.add_argument("--compare", choices=sorted(SIDES), default="order",
                    help="order: longest first vs scheduling order; async: async scheduling vs one round at a time")
    ap.add_argument("--mode", choices=sorted(engine.MODES), default="fusion")
    ap.add_argument("--pairs", type=int, default=2, help="interleaved pairs of the two sides")
    ap.add_argument("--num-seqs", type=int, default=256, help="requests of the workload")
    ap.add_argument("--max-input-len", type=int, default=1024, help="the workload's longest prompt")
    ap.add_argument("--max-output-len", type=int, default=1024, help="the workload's longest output")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new pair after this many seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="default: decode-order.json / async-scheduling.json in the results")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = results_io.default_out("decode-order" if args.compare == "order" else "async-scheduling")
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the pairs and write ``--out``. Returns 0."""
    from nanovllm import SamplingParams
    from nanovllm.engine import scheduler

    args = parse_args(argv)
    t_start = time.perf_counter()
    bw = floors.bandwidth_bytes_per_s()
    out: dict[str, Any] = {**provenance.header(argv, module="benchmarks.harness.decode_order_ab"),
                           "compare": args.compare, "mode": args.mode, "copy_bandwidth_tb_s": round(bw / 1e12, 4)}
    kw = engine.engine_kwargs(args.mode, max_model_len=args.max_model_len, max_num_seqs=512,
                              max_num_batched_tokens=16384, device=args.device)
    llm, build_s = engine.build(args.model, kw)
    out["build_s"] = round(build_s, 2)
    high = engine.prompt_id_high(args.model)
    prompts, max_tokens = workloads.nano_vllm_workload(args.num_seqs, 0, args.max_input_len, args.max_output_len,
                                                       min(100, args.max_input_len), min(100, args.max_output_len))
    prompts = [[t % (high + 1) for t in p] for p in prompts]
    sizes = floors.qwen3_sizes(floors.load_hf_config(args.model))
    out["floor"] = floors.bandwidth_floor([len(p) for p in prompts], max_tokens, bandwidth=bw,
                                          **{k: sizes[k] for k in ("weight_bytes", "kv_bytes_per_token",
                                                                   "flop_per_token")})
    sps = [SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
    engine.run_timed(llm, [p[:8] for p in prompts[:16]], sps[:16])  # nothing left to compile for a first run
    sorted_order = scheduler.decode_order
    cfg = llm.engine.config
    async_default = cfg.async_scheduling
    first, second = SIDES[args.compare]
    rows: list[dict[str, Any]] = []
    try:
        for i in range(args.pairs):
            if rows and time.perf_counter() - t_start > args.budget_s:
                break
            row: dict[str, Any] = {}
            for side in timing.pair_order(i):
                name = first if side == 0 else second
                if args.compare == "order":
                    scheduler.decode_order = sorted_order if side == 0 else (lambda seqs: seqs)
                else:
                    cfg.async_scheduling = side == 0
                shift = 2 * i + side + 1
                t = engine.run_timed(llm, workloads.shifted(prompts, shift, high), sps)
                engine.check_counts(t, max_tokens, f"{name} pair {i}")
                row[name] = {"output_tokens_per_s": round(sum(max_tokens) / t.wall_s, 1),
                             "seconds": round(t.wall_s, 3), "decode_s": round(t.decode_s, 3),
                             "host_s": round(t.host_s, 3)}
            rows.append(row)
            print(f"pair {i}: {first} {row[first]['output_tokens_per_s']:,.0f} {second} "
                  f"{row[second]['output_tokens_per_s']:,.0f} tok/s", flush=True)
    finally:
        scheduler.decode_order = sorted_order
        cfg.async_scheduling = async_default
    ratios = [r[first]["output_tokens_per_s"] / r[second]["output_tokens_per_s"] for r in rows]
    out["pairs"] = rows
    out[f"ratio_{first}_over_{second}"] = timing.ratio_stats(ratios)
    for side in (first, second):
        tps = timing.median([r[side]["output_tokens_per_s"] for r in rows])
        out[f"{side}_median_tokens_per_s"] = tps
        out[f"{side}_fraction_of_floor"] = round(tps / out["floor"]["output_tokens_per_s"], 4)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    results_io.write_json(args.out, out)
    print(f"{first} / {second}: {out[f'ratio_{first}_over_{second}']}; floor {out['floor']['output_tokens_per_s']:,.0f} "
          f"tok/s; wrote {args.out}")
    engine.release(llm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
