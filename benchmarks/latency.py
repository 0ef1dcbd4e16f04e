"""Latency: time to first token and decode step per batch size, fusion against nofusion in interleaved pairs,
against the weights' bandwidth floor.

Both engines live in one process (fusion built first with half of ``--gpu-memory-utilization``, nofusion with
all of it, so each gets about half of the KV pool). For each batch size and pair r, both run the same fresh
prompts (``--prompt-len`` random ids, a seed per batch and pair, so the prefix cache never hits),
``ignore_eos=True``, ``max_tokens=--max-tokens``, in the order (fusion, nofusion) for even r and the reverse for
odd r, so slow drift of clocks and temperature cancels in the per-pair ratio. The benchmark drives the engine's
step loop itself (``harness/engine.py``) and times every step:

- TTFT (ms): from adding the batch's requests until each has its first token;
- decode step (ms): time of the decode steps / (decode tokens / batch), the mean time of one step of the batch;
- ``ratio``: per pair nofusion step / fusion step (> 1: fusion faster), its median, min and max.

Floor: ``weights_bytes`` (bf16 parameters, the tied embedding counted once) read once per step at the copy
bandwidth measured in the same run: ``weights_floor_ms``; ``bandwidth_fraction`` = floor / batch-1 step. Per
batch, ``floor_ms`` adds the K/V bytes the batch reads at its mean context.

``--second-model DIR`` measures a second checkpoint the same way and writes its keys under ``--second-name``
(default ``llama-3.2-1b``). ``--transformers`` adds the transformers-backend decode benchmark of
``benchmarks/harness/hf_decode.py`` (its flags given as one string in ``--transformers-args``) under the key
``transformers``.

Writes ``benchmarks/results/<gpu>/latency.json`` on a GPU (``$OUT/<gpu>/`` when ``OUT`` is set), a temp file
without CUDA; rewritten after every batch size.

Usage::

    python benchmarks/latency.py --model /tmp/qwen3-0.6b
    python benchmarks/latency.py --model /tmp/qwen3-0.6b --second-model /tmp/llama-3.2-1b --batches 1,8
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
import importlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import accelerator, engine, floors, provenance  # noqa: E402
from benchmarks.harness import results_io, tables, timing, workloads  # noqa: E402

SIDES: tuple[str, str] = ("fusion", "nofusion")
PAIRS_AFTER_BUDGET: int = 2


def hf_decode_module() -> ModuleType | None:
    """``benchmarks.harness.hf_decode`` (the transformers-backend decode benchmark) or None when absent."""
    try:
        return importlib.import_module("benchmarks.harness.hf_decode")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith("hf_decode"):
            return None
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring). Exits with status 2 on a bad value."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b")
    ap.add_argument("--second-model", default=None, help="a second checkpoint measured the same way")
    ap.add_argument("--second-name", default="llama-3.2-1b", help="the key of the second checkpoint's figures")
    ap.add_argument("--second-only", action="store_true",
                    help="measure only --second-model and put its figures into the existing JSON at the output path")
    ap.add_argument("--batches", default="1,8,64,256", help="comma list of batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (>= 2)")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved pairs per batch size")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help=f"after this many seconds every remaining batch size gets {PAIRS_AFTER_BUDGET} pairs")
    ap.add_argument("--num-scheduler-steps", type=int, default=None,
                    help="LLM(num_scheduler_steps=...) of both engines (default: the engine's)")
    ap.add_argument("--prefill-cuda-graph-max-tokens", type=int, default=None,
                    help="LLM(prefill_cuda_graph_max_tokens=...) of both engines (default: the engine's, 2048 on one "
                         "GPU; 0 launches every prefill from Python)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transformers", action="store_true",
                    help="also run benchmarks/harness/hf_decode.py (the transformers-backend decode benchmark)")
    ap.add_argument("--transformers-args", default="",
                    help="arguments of that benchmark, as one string (e.g. '--models qwen3-0.6b --batches 1')")
    ap.add_argument("--out", default=None, help="JSON path (default: results/<gpu>/latency.json)")
    args = ap.parse_args(argv)
    hf = hf_decode_module() if args.transformers else None
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        ap.error(f"--batches needs batch sizes >= 1, got {args.batches}")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2 (the decode steps produce tokens 2..T)")
    if args.pairs < 1 or args.prompt_len < 1:
        ap.error("--pairs and --prompt-len must be >= 1")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.second_only and not args.second_model:
        ap.error("--second-only needs --second-model")
    if args.transformers and hf is None:
        ap.error("--transformers needs benchmarks/harness/hf_decode.py (the transformers-backend decode benchmark), "
                 "which this checkout does not have")
    if hf is not None:
        sub = argparse.ArgumentParser(prog="latency.py --transformers-args")
        hf.add_arguments(sub)
        args.transformers_ns = sub.parse_args(shlex.split(args.transformers_args))
    return args


def batch_row(batch: int, floor_ms: float, runs: dict[str, list[engine.Timed]]) -> dict[str, Any]:
    """The JSON row of one batch size from its pairs (``runs[side][pair]``)."""
    row: dict[str, Any] = {"batch": batch, "pairs": len(runs[SIDES[0]]), "floor_ms": round(floor_ms, 5)}
    for side in SIDES:
        steps = [t.decode_step_ms(batch) for t in runs[side]]
        ttfts = [t.ttft_s * 1e3 for t in runs[side]]
        row[side] = {"decode_step_ms": [round(x, 5) for x in steps], "ttft_ms": [round(x, 4) for x in ttfts],
                     "decode_step_ms_median": round(timing.median(steps), 5),
                     "ttft_ms_median": round(timing.median(ttfts), 4)}
        row[side]["bandwidth_fraction"] = round(floor_ms / row[side]["decode_step_ms_median"], 4)
    ratios = [n / f for f, n in zip(row["fusion"]["decode_step_ms"], row["nofusion"]["decode_step_ms"])]
    row["nofusion_over_fusion"] = timing.ratio_stats(ratios)
    return row


def measure(args: argparse.Namespace, model: str, t0: float, save: Any) -> dict[str, Any]:
    """Build both engines on ``model``, time every batch size in interleaved pairs; returns the figures (the keys
    of the module docstring). ``save(partial)`` is called after every batch size."""
    from nanovllm import SamplingParams

    sizes = floors.qwen3_sizes(floors.load_hf_config(model))
    bw = floors.bandwidth_bytes_per_s()
    w_floor_ms = sizes["weight_bytes"] / bw * 1e3
    high = engine.prompt_id_high(model)
    out: dict[str, Any] = {"model": model, "weights_bytes": int(sizes["weight_bytes"]),
                           "weights_floor_ms": round(w_floor_ms, 5), "batch1_decode_step_ms": {},
                           "bandwidth_fraction": {}, "batch1_ttft_ms": {}, "by_batch": [], "engines": {},
                           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
    llms: dict[str, Any] = {}
    try:
        for side, util in zip(SIDES, (args.gpu_memory_utilization / 2, args.gpu_memory_utilization)):
            kw = engine.engine_kwargs(side, dtype=args.dtype, max_model_len=args.max_model_len,
                                      max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_num_batched_tokens,
                                      gpu_memory_utilization=util, seed=args.seed,
                                      num_scheduler_steps=args.num_scheduler_steps, device=args.device)
            if args.prefill_cuda_graph_max_tokens is not None:
                kw["prefill_cuda_graph_max_tokens"] = args.prefill_cuda_graph_max_tokens
            llms[side], build_s = engine.build(model, kw)
            out["engines"][side] = {"llm_kwargs": kw, "build_s": round(build_s, 2),
                                    "num_scheduler_steps": llms[side].config.num_scheduler_steps,
                                    "num_kvcache_blocks": llms[side].config.num_kvcache_blocks}
            pg = getattr(llms[side].engine.model_runner, "prefill_graphs", None)  # the TTFT path: graphed buckets
            out["engines"][side]["prefill_graph_buckets"] = sorted(pg.graphs) if pg is not None else []
            out["engines"][side]["prefill_graph_capture_s"] = round(
                getattr(llms[side].engine.model_runner, "init_seconds", {}).get("prefill_cudagraphs", 0.0), 3)
        sp = SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=args.max_tokens)
        for b in args.batches:
            warm = workloads.random_prompts(b, args.prompt_len, args.seed * 1_000_003 + 10_000_000 + b, high)
            for side in SIDES:  # untimed: compiles and captures what this batch size uses
                engine.run_timed(llms[side], warm, SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True,
                                                                  max_tokens=2))
            pairs = args.pairs if time.perf_counter() - t0 < args.budget_s else min(args.pairs, PAIRS_AFTER_BUDGET)
            runs: dict[str, list[engine.Timed]] = {s: [] for s in SIDES}

            def one(side: str, r: int, b: int = b) -> float:
                prompts = workloads.random_prompts(b, args.prompt_len, args.seed * 1_000_003 + b * 10_000 + r, high)
                t = engine.run_timed(llms[side], prompts, sp)
                engine.check_counts(t, [args.max_tokens] * b, f"{side} batch {b}")
                runs[side].append(t)
                return t.decode_step_ms(b)

            timing.interleaved_pairs([lambda r: one("fusion", r), lambda r: one("nofusion", r)], pairs)
            kv = sizes["kv_bytes_per_token"] * b * (args.prompt_len + args.max_tokens / 2)
            row = batch_row(b, (sizes["weight_bytes"] + kv) / bw * 1e3, runs)
            out["by_batch"].append(row)
            print(f"batch {b}: step fusion {row['fusion']['decode_step_ms_median']:.4f} ms, nofusion "
                  f"{row['nofusion']['decode_step_ms_median']:.4f} ms; TTFT {row['fusion']['ttft_ms_median']:.2f} / "
                  f"{row['nofusion']['ttft_ms_median']:.2f} ms", flush=True)
            if b == 1:
                for side in SIDES:
                    step = row[side]["decode_step_ms_median"]
                    out["batch1_decode_step_ms"][side] = step
                    out["bandwidth_fraction"][side] = round(w_floor_ms / step, 4)
                    out["batch1_ttft_ms"][side] = row[side]["ttft_ms_median"]
            save(out)
    finally:
        for side in list(llms):
            engine.release(llms.pop(side))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure, write the JSON, print the table. Returns 0 (errors propagate after the engines are released)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    path = results_io.results_path("latency", args.out)
    head = {**provenance.header(argv, "benchmarks/latency.py"),
            "copy_bandwidth_tb_s": round(floors.bandwidth_bytes_per_s() / 1e12, 4),
            "copy_bandwidth_measured": accelerator.gpu_slug() != "cpu"}
    res: dict[str, Any] = dict(head)
    if args.second_only:
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
    else:
        res.update(measure(args, args.model, t0, lambda part: results_io.write_json(path, {**res, **part})))
        results_io.write_json(path, res)
    if args.second_model:  # its own header: it may come from another run than the top-level figures
        res[args.second_name] = {**head, **measure(args, args.second_model, t0, lambda part: results_io.write_json(
            path, {**res, args.second_name: {**head, **part}}))}
        results_io.write_json(path, res)
    if args.transformers:
        hf = hf_decode_module()
        assert hf is not None  # parse_args checked it
        res["transformers"] = hf.run(args.transformers_ns)
        results_io.write_json(path, res)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    results_io.write_json(path, res)
    rows = [[r["batch"], r["pairs"], r["fusion"]["decode_step_ms_median"], r["nofusion"]["decode_step_ms_median"],
             r["nofusion_over_fusion"]["median"], r["floor_ms"], r["fusion"]["ttft_ms_median"],
             r["nofusion"]["ttft_ms_median"]] for r in res.get("by_batch", [])]
    tables.print_table(["batch", "pairs", "fusion step ms", "nofusion step ms", "nofusion/fusion", "floor ms",
                        "fusion TTFT ms", "nofusion TTFT ms"], rows,
                       title=f"Latency, prompt {args.prompt_len}, {args.max_tokens} tokens, {res['gpu']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
