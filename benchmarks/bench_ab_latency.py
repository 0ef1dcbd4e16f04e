"""A/B decode latency of two engine modes, both engines alive in one process, their repetitions interleaved.

Why: ``bench_latency.py`` / ``bench_e2e.py`` build one engine per mode and time the modes one after the other.
On the H200, two such runs of identical code paths differ by 2-4 % (batch 128 decode step: 3.643 ms in one session,
3.777 ms in the next; see benchmarks/results/latency-h200*.json), more than the 1 % we must resolve ("no batch size
slower by more than 1 % with fusion on"). Drift of clocks, temperature and memory placement between the two
measurement windows lands entirely on one mode.

How: engine A (built first, with half of ``--gpu-memory-utilization``) and engine B (built second, with the full
value, so its KV cache gets about the other half: the engine sizes its pool from ``utilization * total -
(memory outside PyTorch + PyTorch's peak allocated)`` and A's tensors count in that peak) both stay alive. Each
warms up every batch size (untimed ``generate(max_tokens=2)``, A then B per batch size). Then, for each batch size
B and each pair r, both engines run ``generate`` on the SAME fresh prompts (B prompts of ``--prompt-len`` random
ids, their own seed per (batch, r), so the prefix cache never hits), ``ignore_eos=True``, ``max_tokens=T``, in the
order (A, B) for even r and (B, A) for odd r. A pair's two runs are seconds apart, so slow drift cancels in the
per-pair ratio:

- decode step (ms) = delta of ``llm.stats()["decode_seconds"]`` / (delta of ``decode_tokens`` / B): the mean time
  of one decode step of the batch, from the engine's own step timers (prefill excluded);
- ratio = step(B) / step(A) per pair (> 1: A is faster); per batch its median, min, max, the count of pairs with
  ratio > 1 (``a_faster_pairs``) and the ratio of the two engines' median steps;
- prefill (ms) = delta of ``llm.stats()["prefill_seconds"]``: the engine's prefill steps of the call, each timed
  from its scheduling to its post-processing (at batch 1 the TTFT less the request's setup); ``prefill_ratio_median``
  = median of prefill(B) / prefill(A).

Summary: ``worst_ratio`` = min over batch sizes of ``ratio_median``; ``slower_than_1pct`` = the batch sizes whose
``ratio_median`` < 0.99 (A more than 1 % slower than B). ``--modes X,X`` (the same mode twice) measures the noise
floor of the method itself.

Writes (default) benchmarks/results/latency-ab-h200.json on a CUDA machine, a file in the temp folder elsewhere;
rewritten after every batch size, so a killed run keeps what it measured.

Usage::

    python benchmarks/bench_ab_latency.py --model /tmp/q06                     # H200: fusion-ms8 vs nofusion-ms8
    python benchmarks/bench_ab_latency.py --model /tmp/q06 --modes fusion,nofusion --pairs 9
    python benchmarks/bench_ab_latency.py --model /tmp/tiny --device cpu --dtype float32 --modes eager,nofusion \\
        --batches 1,2 --prompt-len 8 --max-tokens 6 --pairs 2 --max-model-len 64 --out /tmp/ab.json   # CPU smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_latency import TEMPERATURE  # noqa: E402

common.add_repo_to_path()

MODES: dict[str, dict[str, Any]] = common.ENGINE_MODES
SLOWER_THRESHOLD: float = 0.99  # ratio_median below this: A is more than 1 % slower than B
PAIRS_AFTER_BUDGET: int = 2  # pairs per batch size once --budget-s has passed
ROLES: tuple[str, str] = ("A", "B")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring); ``args.modes`` becomes a list of two mode names and
    ``args.batches`` a list of ints.

    Raises:
        SystemExit: (argparse, exit status 2, message on stderr) not exactly two modes, an unknown mode, a batch
            size, pair count or prompt length below 1, ``--max-tokens`` below 2, a memory fraction outside (0, 1].
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b")
    ap.add_argument("--modes", default="fusion-ms8,nofusion-ms8",
                    help=f"'A,B': exactly two of {sorted(MODES)} (A is built first; ratios are B/A)")
    ap.add_argument("--batches", default="1,8,32,128,256", help="comma list of batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="T: output tokens per request (>= 2)")
    ap.add_argument("--pairs", type=int, default=7, help="interleaved (A, B) pairs per batch size")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help=f"once this many seconds have passed since the start (engine builds included), every "
                         f"remaining batch size gets {PAIRS_AFTER_BUDGET} pairs")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="engine B's fraction of GPU memory; engine A (built first) gets half of it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/latency-ab-h200.json on a CUDA machine; elsewhere "
                         "a file in the temp folder, so CPU runs never overwrite the committed GPU results)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if len(modes) != 2:
        ap.error(f"--modes needs exactly two modes 'A,B', got {len(modes)}: {modes}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {sorted(MODES)}")
    args.modes = modes
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        ap.error(f"--batches needs batch sizes >= 1, got {args.batches}")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2 (the decode steps are tokens 2..T)")
    if args.pairs < 1 or args.prompt_len < 1:
        ap.error("--pairs and --prompt-len must be >= 1")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    args.out = args.out or common.default_out("latency-ab")
    return args


def role_kwargs(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """``LLM`` keyword arguments of engine ``role`` ("A" or "B"): its mode of ``args.modes``, max_num_seqs = the
    largest batch, and for A (built first) half of ``--gpu-memory-utilization``."""
    mode = args.modes[ROLES.index(role)]
    util = args.gpu_memory_utilization / 2 if role == "A" else args.gpu_memory_utilization
    sub = argparse.Namespace(**{**vars(args), "gpu_memory_utilization": util})
    return common.engine_kwargs(sub, mode, max(args.batches))


def prompt_id_high(model: str) -> int:
    """Largest prompt token id: 10,000 (as bench_latency) or ``vocab_size - 1`` of a smaller test checkpoint."""
    vocab = common.load_hf_config(model).get("vocab_size")
    return min(10000, int(vocab) - 1) if vocab else 10000


def run_once(llm: Any, label: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """One timed ``generate`` of ``prompts`` with ``max_tokens`` output tokens each (ignore_eos, TEMPERATURE).

    Returns:
        dict: decode_step_ms (decode seconds of the engine's step timers / decode steps per sequence, in ms),
        prefill_ms (prefill seconds of the engine's step timers, in ms), wall_s (wall time of the call between
        device synchronisations, seconds), decode_tokens (tokens the decode steps produced), cached_tokens (prompt
        tokens served by the prefix cache; a warning is printed when > 0).

    Raises:
        RuntimeError: a request returned other than ``max_tokens`` tokens, or the engine counted no decode token.
    """
    from nanovllm import SamplingParams

    batch = len(prompts)
    sp = SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=max_tokens)
    s0 = llm.stats()
    outs, wall = common.timed(llm.generate, prompts, sp, use_tqdm=False)
    s1 = llm.stats()
    bad = [len(o["token_ids"]) for o in outs if len(o["token_ids"]) != max_tokens]
    if len(outs) != batch or bad:
        raise RuntimeError(f"[{label}] batch {batch}, max_tokens {max_tokens}: got {len(outs)} outputs, "
                           f"wrong token counts {bad[:5]}")
    hits = sum(int(o.get("num_cached_tokens") or 0) for o in outs)
    if hits:
        print(f"[{label}] warning: batch {batch}: {hits} prompt tokens served by the prefix cache", flush=True)
    d_sec = float(s1["decode_seconds"]) - float(s0["decode_seconds"])
    d_tok = float(s1["decode_tokens"]) - float(s0["decode_tokens"])
    if d_tok <= 0:
        raise RuntimeError(f"[{label}] batch {batch}: the engine counted no decode token ({d_tok})")
    p_sec = float(s1["prefill_seconds"]) - float(s0["prefill_seconds"])
    return {"decode_step_ms": round(d_sec / (d_tok / batch) * 1e3, 5), "prefill_ms": round(p_sec * 1e3, 4),
            "wall_s": round(wall, 5),
            "decode_tokens": d_tok, "cached_tokens": hits}


def batch_row(batch: int, order: list[str], runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """The JSON row of one batch size from its pairs.

    Args:
        order: per pair "AB" or "BA" (which engine ran first).
        runs: per role, per pair, :func:`run_once`'s result.

    Returns:
        dict: batch, pairs, order, per role ``A`` / ``B``: decode_step_ms and wall_s (lists, per pair) and their
        medians; ratios (per pair, B/A of decode_step_ms: > 1 means A is faster), ratio_median, ratio_min,
        ratio_max, a_faster_pairs (ratios > 1), ratio_of_medians (median B step / median A step), wall_ratio_median,
        per role prefill_ms (list) and prefill_ms_median, prefill_ratio_median (per pair B/A of prefill_ms).
    """
    row: dict[str, Any] = {"batch": batch, "pairs": len(order), "order": list(order)}
    for role in ROLES:
        steps = [r["decode_step_ms"] for r in runs[role]]
        walls = [r["wall_s"] for r in runs[role]]
        prefills = [r["prefill_ms"] for r in runs[role]]
        row[role] = {"decode_step_ms": steps, "wall_s": walls, "prefill_ms": prefills,
                     "decode_step_ms_median": round(common.median(steps), 5),
                     "prefill_ms_median": round(common.median(prefills), 4),
                     "wall_s_median": round(common.median(walls), 5)}
    a, b = row["A"], row["B"]
    ratios = [round(sb / sa, 6) for sa, sb in zip(a["decode_step_ms"], b["decode_step_ms"])]
    row["ratios"] = ratios
    row["ratio_median"] = round(common.median(ratios), 6)
    row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
    row["a_faster_pairs"] = sum(1 for r in ratios if r > 1.0)
    row["ratio_of_medians"] = round(b["decode_step_ms_median"] / a["decode_step_ms_median"], 6)
    row["wall_ratio_median"] = round(common.median([wb / wa for wa, wb in zip(a["wall_s"], b["wall_s"])]), 6)
    row["prefill_ratio_median"] = round(common.median([pb / pa for pa, pb in zip(a["prefill_ms"], b["prefill_ms"])
                                                       if pa > 0]), 6) if any(a["prefill_ms"]) else None
    return row


def summarize(rows: list[dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """``worst_ratio`` (min ratio_median over the rows) and its batch, ``slower_than_1pct`` (batch sizes whose
    ratio_median < :data:`SLOWER_THRESHOLD`), ``a_within_1pct`` (none is) and ``complete`` (every batch measured)."""
    worst = min(rows, key=lambda r: r["ratio_median"]) if rows else None
    slower = [r["batch"] for r in rows if r["ratio_median"] < SLOWER_THRESHOLD]
    return {"worst_ratio": worst["ratio_median"] if worst else None, "worst_batch": worst["batch"] if worst else None,
            "slower_than_1pct": slower, "a_within_1pct": not slower, "threshold": SLOWER_THRESHOLD,
            "complete": len(rows) == len(batches)}


def print_summary(result: dict[str, Any]) -> None:
    """The per-batch table (median steps, ratios, wall medians) and the summary line."""
    a, b = result["modes"]
    rows = [[r["batch"], r["pairs"], r["A"]["decode_step_ms_median"], r["B"]["decode_step_ms_median"],
             r["ratio_median"], r["ratio_min"], r["ratio_max"], f"{r['a_faster_pairs']}/{r['pairs']}",
             r["ratio_of_medians"], r["A"]["wall_s_median"], r["B"]["wall_s_median"], r["A"]["prefill_ms_median"],
             r["B"]["prefill_ms_median"], r["prefill_ratio_median"]] for r in result["rows"]]
    headers = ["batch", "pairs", f"A={a} step ms", f"B={b} step ms", "B/A med", "B/A min", "B/A max", "A faster",
               "B/A of medians", "A wall s", "B wall s", "A prefill ms", "B prefill ms", "prefill B/A med"]
    common.print_table(headers, rows, title=f"Interleaved A/B decode step, prompt {result['prompt_len']}, "
                                            f"T={result['max_tokens']}, {result['meta']['gpu']['name']}")
    s = result["summary"]
    print(f"worst ratio_median {s['worst_ratio']} (batch {s['worst_batch']}); A more than 1 % slower at: "
          f"{s['slower_than_1pct'] or 'none'}; total {result.get('total_s')} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Build both engines, warm them up, time the interleaved pairs, write the JSON after every batch size, print
    the table. Returns 0. Errors (a failed build, a wrong token count) are recorded in the JSON under ``error``
    and raised; both engines are shut down in every case."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    batches: list[int] = args.batches
    T = args.max_tokens
    high = prompt_id_high(args.model)
    meta = common.run_metadata(None if argv is None else [sys.argv[0] or __file__, *argv])
    result: dict[str, Any] = {
        "benchmark": "latency-ab", "model": args.model, "modes": list(args.modes),
        "method": "both engines alive in one process; per batch size and pair r, generate(the same fresh prompts, "
                  f"ignore_eos, temperature {TEMPERATURE}, max_tokens=T) on A then B (r even) or B then A (r odd); "
                  "decode step = delta decode_seconds / (delta decode_tokens / batch) of LLM.stats(); ratio = "
                  "step(B) / step(A) per pair (> 1: A faster)",
        "prompt_len": args.prompt_len, "max_tokens": T, "batch_sizes": batches, "pairs_requested": args.pairs,
        "prompt_id_high": high, "args": {k: v for k, v in vars(args).items()}, "engines": {}, "rows": [],
        "summary": summarize([], batches), "meta": meta,
    }
    engines: dict[str, Any] = {}

    def save() -> str:
        result["summary"] = summarize(result["rows"], batches)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        return common.write_json(args.out, result)

    try:
        from nanovllm import LLM

        for role in ROLES:  # A first, with half the memory fraction
            kw = role_kwargs(args, role)
            mode = args.modes[ROLES.index(role)]
            print(f"\n=== engine {role} = {mode}: LLM({args.model!r}, {kw})", flush=True)
            tb = time.perf_counter()
            engines[role] = LLM(args.model, **kw)
            built = time.perf_counter() - tb
            cfg = common.engine_config(engines[role], kw)
            runner = getattr(getattr(engines[role], "engine", None), "model_runner", None)
            result["engines"][role] = {
                "mode": mode, "kwargs": cfg["kwargs"], "build_s": round(built, 2),
                "num_kvcache_blocks": int(engines[role].config.num_kvcache_blocks),
                "init_seconds": {k: round(v, 2) for k, v in (getattr(runner, "init_seconds", None) or {}).items()},
                "resolved_config": cfg.get("resolved"),
            }
            print(f"[{role}={mode}] built in {built:.1f} s, {engines[role].config.num_kvcache_blocks} KV blocks",
                  flush=True)
            save()

        tw = time.perf_counter()
        for b in batches:  # untimed warm-up of every batch size, A then B
            prompts = common.random_prompts(b, args.prompt_len, args.seed * 1_000_003 + 10_000_000 + b, high)
            for role in ROLES:
                run_once(engines[role], role, prompts, 2)
        result["warmup_s"] = round(time.perf_counter() - tw, 1)
        print(f"warm-up of every batch size on both engines: {result['warmup_s']} s", flush=True)

        for b in batches:
            n_pairs = args.pairs if time.perf_counter() < deadline else min(args.pairs, PAIRS_AFTER_BUDGET)
            order: list[str] = []
            runs: dict[str, list[dict[str, float]]] = {role: [] for role in ROLES}
            for r in range(n_pairs):
                prompts = common.random_prompts(b, args.prompt_len, args.seed * 1_000_003 + b * 10_000 + r, high)
                seq = ROLES if r % 2 == 0 else ROLES[::-1]
                order.append("".join(seq))
                for role in seq:
                    runs[role].append(run_once(engines[role], role, prompts, T))
            row = batch_row(b, order, runs)
            result["rows"].append(row)
            save()
            print(f"batch {b:4d}: A {row['A']['decode_step_ms_median']:.4f} ms  B "
                  f"{row['B']['decode_step_ms_median']:.4f} ms  B/A median {row['ratio_median']:.4f} "
                  f"[{row['ratio_min']:.4f}, {row['ratio_max']:.4f}], A faster in {row['a_faster_pairs']}/{n_pairs} "
                  f"pairs ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        save()
        raise
    finally:
        for role in list(engines):
            common.shutdown_engine(engines.pop(role))
        common.free_accelerator_memory(report=True)

    path = save()
    print_summary(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
