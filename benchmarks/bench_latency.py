"""TTFT and TPOT at several batch sizes, with and without the coconut fusion, on the 0.6B-shaped checkpoint.

For each engine mode (one ``LLM`` per mode, built one after the other in this process, released in between):

- ``fusion``:   compile_fusion=True,  enforce_eager=False (coconut backend + CUDA graphs)
- ``nofusion``: compile_fusion=False, enforce_eager=False (Inductor + CUDA graphs)
- ``eager``:    enforce_eager=True (reference: no compilation, no CUDA graphs)

and each batch size B (default 1, 8, 32, 128, 256), B prompts of ``--prompt-len`` (512) random token ids are
generated with ``ignore_eos=True``:

- TTFT(B) = wall time of ``generate(prompts, max_tokens=1)``: the prefill step(s) of the whole batch plus the
  sampling of every first token (chunked into ``max_num_batched_tokens``-sized steps for large B).
- TPOT(B) = (time(max_tokens=T) - time(max_tokens=1)) / (T - 1), T = ``--max-tokens`` (128): the mean time of
  one decode step of the batch (seconds per output token of one sequence).

Each figure is the median over repetitions (more at small B). Every timed call uses fresh random prompts (their
own seed per batch, repetition and T), so the prefix cache never serves a prefill; the prompt sets are the same
across modes. Before timing a batch size, one untimed ``generate(max_tokens=2)`` at that size warms up that
prefill shape and decode graph.

Writes (default) benchmarks/results/latency-h200.json: every raw time, the medians, per-batch speedups
(TPOT and TTFT of nofusion / fusion, and of eager / fusion), batch1_tpot_speedup = TPOT(nofusion) / TPOT(fusion)
at batch 1, the engine settings and the run metadata; prints a table.

Usage::

    python benchmarks/bench_latency.py --model /tmp/qwen3-0.6b
    python benchmarks/bench_latency.py --model /tmp/tiny --device cpu --modes eager --batches 1,2 \\
        --prompt-len 32 --max-tokens 4 --out /tmp/lat.json                                  # CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.add_repo_to_path()

MODES: dict[str, dict[str, Any]] = common.ENGINE_MODES
TEMPERATURE = 0.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b")
    ap.add_argument("--modes", default="fusion,nofusion,eager", help=f"comma list of {sorted(MODES)}")
    ap.add_argument("--batches", default="1,8,32,128,256", help="comma list of batch sizes")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128, help="T of the TPOT formula (>= 2)")
    ap.add_argument("--reps", default=None,
                    help="repetitions per batch as 'B:n,...' (default: 5 up to B=8, 3 up to B=32, else 2)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="once this many seconds have passed since the start, every remaining batch size gets 1 "
                         "repetition (keeps the whole run near ~6 minutes on the H200)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/latency-h200.json on a CUDA machine; elsewhere "
                         "a file in the temp folder, so CPU test runs never overwrite the committed GPU results)")
    args = ap.parse_args(argv)
    args.out = args.out or common.default_out("latency")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2")
    return args


def default_reps(batch: int) -> int:
    """Repetitions per batch size: fewer at big batches, where each call is long and the spread is small; never
    fewer than 3, so the median drops one outlier (an H200 run had one TTFT call of 2.4 s among 0.5 s ones)."""
    return 5 if batch <= 8 else 3


def parse_reps(spec: str | None, batches: list[int]) -> dict[int, int]:
    """``'1:7,256:1'`` -> {1: 7, 256: 1, other batches: default_reps}."""
    reps = {b: default_reps(b) for b in batches}
    if spec:
        for item in spec.split(","):
            b, n = item.split(":")
            reps[int(b)] = int(n)
    return reps


def llm_kwargs(args: argparse.Namespace, mode: str, batches: list[int]) -> dict[str, Any]:
    """Keyword arguments of ``LLM(model, **kwargs)`` for one mode (max_num_seqs = the largest batch)."""
    return common.engine_kwargs(args, mode, max(max(batches), 1))


def measure_mode(mode: str, args: argparse.Namespace, batches: list[int], reps: dict[int, int],
                 deadline: float = float("inf"), llm: Any = None, engine_kwargs: dict[str, Any] | None = None,
                 init_s: float | None = None, on_batch: Callable[[dict[str, Any]], None] | None = None
                 ) -> dict[str, Any]:
    """Build one engine, time TTFT / TPOT at every batch size, release the engine.

    After ``deadline`` (a ``time.perf_counter()`` value) every remaining batch size gets one repetition.

    Args:
        llm: a prebuilt engine of this ``mode`` (its max_num_seqs at least max(batches)); when given, it is
            neither built nor shut down here, ``engine_kwargs`` (the keywords it was built with) are recorded in
            ``engine_config``, ``init_s`` is the caller's build time of that engine (None if not given; the build
            is shared with the caller's other measurements) and ``prebuilt_engine`` is True.
        on_batch: called with the mode's result so far after every batch size (to save partial results).

    Returns:
        dict: init_s, engine_config, and ``batches``: {str(B): {ttft_ms, tpot_ms (medians), t1_s, tT_s (raw
        lists of seconds), reps, and from the engine's step timers (``LLM.stats()``) when present:
        ttft_steps_ms (median seconds inside the prefill steps of a max_tokens=1 call) and decode_step_ms
        (median decode seconds / decode steps of a max_tokens=T call)}}.

    Raises:
        RuntimeError: a request returned a number of tokens other than max_tokens.
    """
    from nanovllm import SamplingParams

    llm, kw, res, own = common.mode_engine(mode, args.model, "latency", lambda: llm_kwargs(args, mode, batches), llm,
                                           engine_kwargs, init_s, batches={})
    if not own:
        cap = getattr(getattr(llm, "config", None), "max_num_seqs", None)
        if isinstance(cap, int) and cap < max(batches):
            raise ValueError(f"the prebuilt engine's max_num_seqs {cap} < the largest batch {max(batches)}")
    T = args.max_tokens

    def stats() -> dict[str, Any] | None:
        fn = getattr(llm, "stats", None)
        try:
            return dict(fn()) if callable(fn) else None
        except Exception:  # noqa: BLE001 - engine counters are optional
            return None

    def run(batch: int, n_tokens: int, seed: int) -> tuple[float, dict[str, float] | None]:
        """Time one generate; returns (seconds, delta of the engine's counters or None)."""
        prompts = common.random_prompts(batch, args.prompt_len, seed)
        sp = SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n_tokens)
        s0 = stats()
        outs, dt = common.timed(llm.generate, prompts, sp, use_tqdm=False)
        s1 = stats()
        bad = [len(o["token_ids"]) for o in outs if len(o["token_ids"]) != n_tokens]
        if len(outs) != batch or bad:
            raise RuntimeError(f"batch {batch}, max_tokens {n_tokens}: got {len(outs)} outputs, token counts {bad[:5]}")
        hits = sum(int(o.get("num_cached_tokens") or 0) for o in outs)
        if hits:
            print(f"[{mode}] warning: batch {batch}: {hits} prompt tokens served by the prefix cache", flush=True)
        delta = None
        if s0 is not None and s1 is not None:
            delta = {k: float(s1[k]) - float(s0[k]) for k in ("prefill_seconds", "decode_seconds", "decode_tokens")
                     if k in s0 and k in s1}
        return dt, delta

    try:
        t_start = time.perf_counter()
        # Warm-up, untimed, every batch size before any timing: first uses compile shape variants and time the
        # fused op's prefill sizes (tens of seconds), and the engine is left in its serving state for every mode.
        # Seeds: distinct per (batch, rep, T) and identical across modes; the warm-up uses its own.
        for b in batches:
            run(b, 2, seed=args.seed * 1_000_003 + 10_000_000 + b)
        print(f"[{mode}] warm-up of every batch size: {time.perf_counter() - t_start:.1f} s", flush=True)
        for b in batches:
            t1s, tTs, pre_steps, dec_steps = [], [], [], []
            n_reps = reps[b] if time.perf_counter() < deadline else 1
            for r in range(n_reps):
                base = args.seed * 1_000_003 + b * 1000 + r * 2
                t1, d1 = run(b, 1, base)
                tT, dT = run(b, T, base + 1)
                t1s.append(t1)
                tTs.append(tT)
                if d1 and "prefill_seconds" in d1:
                    pre_steps.append(d1["prefill_seconds"])
                if dT and dT.get("decode_tokens"):
                    dec_steps.append(dT["decode_seconds"] / (dT["decode_tokens"] / b))
            ttft = common.median(t1s)
            tpot = (common.median(tTs) - ttft) / (T - 1)
            row: dict[str, Any] = {"batch": b, "ttft_ms": round(ttft * 1e3, 3), "tpot_ms": round(tpot * 1e3, 4),
                                   "decode_tokens_per_s": round(b / tpot, 1) if tpot > 0 else None,
                                   "reps": n_reps, "t1_s": [round(t, 5) for t in t1s],
                                   "tT_s": [round(t, 5) for t in tTs]}
            if pre_steps:  # engine step timers: time inside the prefill steps / per decode step
                row["ttft_steps_ms"] = round(common.median(pre_steps) * 1e3, 3)
            if dec_steps:
                row["decode_step_ms"] = round(common.median(dec_steps) * 1e3, 4)
            res["batches"][str(b)] = row
            print(f"[{mode}] batch {b:4d}: TTFT {ttft * 1e3:9.2f} ms  TPOT {tpot * 1e3:8.3f} ms  "
                  f"(engine steps: prefill {row.get('ttft_steps_ms', '-')} ms, decode step "
                  f"{row.get('decode_step_ms', '-')} ms; {n_reps} reps, {time.perf_counter() - t_start:.0f} s so far)",
                  flush=True)
            if on_batch is not None:
                on_batch(res)
        res["measure_s"] = round(time.perf_counter() - t_start, 1)
        res["engine_config"] = common.engine_config(llm, kw)
    finally:
        if own:
            common.shutdown_engine(llm)
            del llm
            common.free_accelerator_memory(report=True)
    return res


# (slower candidate, faster candidate) pairs reported as ratios "<a>_over_<b>" (> 1: b is faster)
SPEEDUP_PAIRS: list[tuple[str, str]] = [("nofusion", "fusion"), ("eager", "fusion"),
                                        ("nofusion-ms8", "fusion-ms8"), ("fusion", "fusion-ms8"),
                                        ("nofusion", "nofusion-ms8")]


def speedups(modes: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """Per-batch ratios of tpot and ttft for each pair of :data:`SPEEDUP_PAIRS` measured (nofusion / fusion,
    eager / fusion, the same with multi-step decode, and single-step / multi-step)."""
    out: dict[str, Any] = {}
    for other, base in SPEEDUP_PAIRS:
        f = modes.get(base, {}).get("batches", {})
        o = modes.get(other, {}).get("batches", {})
        per: dict[str, Any] = {}
        for b in batches:
            fb, ob = f.get(str(b)), o.get(str(b))
            if fb and ob and fb["tpot_ms"] > 0 and fb["ttft_ms"] > 0:
                per[str(b)] = {"tpot": round(ob["tpot_ms"] / fb["tpot_ms"], 4),
                               "ttft": round(ob["ttft_ms"] / fb["ttft_ms"], 4)}
        if per:
            out[f"{other}_over_{base}"] = per
    return out


def new_result(args: argparse.Namespace, batches: list[int], reps: dict[int, int],
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document before any mode is measured (``meta``: default :func:`common.run_metadata`)."""
    return {
        "benchmark": "latency",
        "model": args.model,
        "method": "TTFT = median wall time of generate(B prompts, max_tokens=1); TPOT = (median time(max_tokens=T) "
                  "- TTFT) / (T - 1); fresh random prompts per call (no prefix-cache hits), ignore_eos, "
                  f"temperature {TEMPERATURE}",
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "batch_sizes": batches,
        "reps": {str(b): n for b, n in reps.items()},
        "modes": {}, "speedups": {}, "batch1_tpot_speedup": None,
        "meta": common.run_metadata() if meta is None else meta,
    }


def update_speedups(result: dict[str, Any]) -> None:
    """Recompute ``speedups`` and ``batch1_tpot_speedup`` from the modes measured so far."""
    result["speedups"] = speedups(result["modes"], result["batch_sizes"])
    b1 = result["speedups"].get("nofusion_over_fusion", {}).get("1")
    result["batch1_tpot_speedup"] = b1["tpot"] if b1 else None
    b1 = result["speedups"].get("nofusion-ms8_over_fusion-ms8", {}).get("1")
    result["batch1_tpot_speedup_ms8"] = b1["tpot"] if b1 else None


def print_summary(result: dict[str, Any], modes: list[str]) -> None:
    """The latency table (TTFT / TPOT per batch and mode, nofusion/fusion ratios) and one line per mode."""
    rows = []
    for b in result["batch_sizes"]:
        row: list[Any] = [b]
        for m in modes:
            mb = result["modes"].get(m, {}).get("batches", {}).get(str(b), {})
            row += [mb.get("ttft_ms"), mb.get("tpot_ms")]
        sp = result["speedups"].get("nofusion_over_fusion", {}).get(str(b), {})
        row += [sp.get("tpot"), sp.get("ttft")]
        rows.append(row)
    headers = ["batch"] + [f"{m} {x}" for m in modes for x in ("TTFT ms", "TPOT ms")] + \
              ["TPOT off/on", "TTFT off/on"]
    common.print_table(headers, rows, title=f"Latency, prompt {result['prompt_len']}, T={result['max_tokens']}, "
                                            f"{result['meta']['gpu']['name']}")
    for m in modes:
        r = result["modes"].get(m, {})
        err = f"  ERROR {r['error']}" if "error" in r else ""
        skip = f"  SKIPPED ({r.get('note', '')})" if r.get("skipped") else ""
        print(f"{m}: init {r.get('init_s')} s, measure {r.get('measure_s')} s{err}{skip}")
    print(f"batch1_tpot_speedup (TPOT off / on): {result['batch1_tpot_speedup']}; total {result.get('total_s')} s")


def main(argv: list[str] | None = None) -> int:
    """Measure every mode, write the JSON (after each mode, so a crash keeps what was measured), print a table."""
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {sorted(MODES)}")
    batches = [int(b) for b in args.batches.split(",")]
    reps = parse_reps(args.reps, batches)
    result = new_result(args, batches, reps)
    t0 = time.perf_counter()
    failures = []
    for mode in modes:
        try:
            result["modes"][mode] = measure_mode(mode, args, batches, reps, deadline=t0 + args.budget_s)
        except Exception as e:  # noqa: BLE001 - keep going with the other modes
            import traceback
            traceback.print_exc()
            result["modes"][mode] = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
            failures.append(mode)
            common.free_accelerator_memory()
        update_speedups(result)
        result["total_s"] = round(time.perf_counter() - t0, 1)
        path = common.write_json(args.out, result)

    print_summary(result, modes)
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
