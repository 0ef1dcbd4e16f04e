"""Offline throughput on nano-vLLM's benchmark workload, with the Hugging Face peer and the bandwidth floor.

Workload (nano-vLLM's bench.py; the RNG order of shared/probes/floor.py and hf_peer.py): ``random.seed(0)``;
256 prompts of ``randint(100, 1024)`` random token ids in [0, 10000], then one
``SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024))`` per prompt; 142,827 prompt
tokens and 133,966 output tokens. All requests go to one ``LLM.generate`` call.

Figure of merit: output tokens/s = generated tokens / wall time of that ``generate`` call (prefill included,
engine construction, compilation and warm-up excluded). Before the timed call the engine is warmed up with one
short generate plus one batch of prompts of several lengths (so that shape-dependent compilation of the
prefill graph happens before timing; the warm-up prompts share no prefix with the workload's).

Prefill / decode split: the engine's step timers (``LLM.stats()``: seconds spent in prefill steps and in decode
steps), read before and after the timed call. Without them (an engine lacking ``stats()``), a separate timed
``generate`` of same-length prompts with other ids and ``max_tokens=1`` estimates the prefill alone.

Peer (``--peer``): transformers ``generate`` on the same checkpoint (eager, sdpa attention, bf16 on CUDA,
dynamic cache), on the first ``--peer-num-seqs`` requests (default 32) as one left-padded batch, sampling at
temperature 0.6, EOS ignored. transformers runs every row for max(max_tokens) steps; only each request's own
max_tokens count as useful output (as in shared/probes/hf_peer.py).

Floor: the bandwidth/compute floor of shared/probes/floor.py for this workload, with the model sizes taken from
the checkpoint's config.json and the H200's measured 4.3 TB/s and 790 TFLOP/s (times tensor_parallel_size).

Usage (GPU)::

    python benchmarks/bench_throughput.py --model /tmp/qwen3-0.6b --compile-fusion --peer
    python benchmarks/bench_throughput.py --model /tmp/qwen3-0.6b --modes fusion,nofusion --peer
CPU smoke test::

    python benchmarks/bench_throughput.py --model /tmp/tiny --device cpu --enforce-eager --num-seqs 4 \\
        --min-input-len 16 --max-input-len 64 --min-output-len 4 --max-output-len 16 --peer --peer-num-seqs 2 \\
        --out /tmp/tp.json

(/tmp/tiny: a checkpoint whose vocabulary holds the workload's token ids, up to 10000, e.g.
``nanovllm.utils.tiny_model.build_tiny_checkpoint('/tmp/tiny', vocab_size=10240)``.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.add_repo_to_path()

# Engine modes: name -> LLM keywords.
MODES: dict[str, dict[str, Any]] = common.ENGINE_MODES
TEMPERATURE = 0.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b", help="checkpoint folder")
    ap.add_argument("--compile-fusion", action="store_true", help="LLM(compile_fusion=True) (single mode)")
    ap.add_argument("--enforce-eager", action="store_true", help="LLM(enforce_eager=True) (single mode)")
    ap.add_argument("--modes", default=None,
                    help=f"comma list of {sorted(MODES)} run one after the other in this process (overrides "
                         "--compile-fusion/--enforce-eager); the first is the headline figure")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024, help="prompt lengths are randint(100, this)")
    ap.add_argument("--max-output-len", type=int, default=1024, help="max_tokens are randint(100, this)")
    ap.add_argument("--min-input-len", type=int, default=100,
                    help="the 100 of randint(100, max_input_len) (smaller only for test workloads)")
    ap.add_argument("--min-output-len", type=int, default=100,
                    help="the 100 of randint(100, max_output_len) (smaller only for test workloads)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed generate calls per mode (median reported); each repetition changes every prompt's "
                         "first token id so that the prefix cache cannot reuse the previous one")
    ap.add_argument("--no-split", action="store_true",
                    help="without engine step timers, skip the prefill-only run that estimates the split")
    ap.add_argument("--peer", action="store_true", help="also time transformers generate (see docstring)")
    ap.add_argument("--peer-num-seqs", type=int, default=32, help="the peer runs the first N requests")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="LLM(device=...); default: engine's")
    ap.add_argument("--dtype", default="auto", help="LLM(dtype=...)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0, help="workload seed and LLM(seed=...)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/throughput-h200.json on a CUDA machine; elsewhere "
                         "a file in the temp folder, so CPU test runs never overwrite the committed GPU results)")
    args = ap.parse_args(argv)
    args.out = args.out or common.default_out("throughput")
    if not 1 <= args.min_input_len <= args.max_input_len or not 1 <= args.min_output_len <= args.max_output_len:
        ap.error("need 1 <= --min-input-len <= --max-input-len and 1 <= --min-output-len <= --max-output-len")
    return args


def selected_modes(args: argparse.Namespace) -> list[str]:
    """The engine modes to run, in order. Raises SystemExit on an unknown mode name."""
    if args.modes:
        names = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in names if m not in MODES]
        if bad:
            raise SystemExit(f"unknown mode(s) {bad}; choose from {sorted(MODES)}")
        return names
    if args.enforce_eager:
        return ["eager"]
    return ["fusion" if args.compile_fusion else "nofusion"]


def llm_kwargs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Keyword arguments of ``LLM(model, **kwargs)`` for one mode."""
    return common.engine_kwargs(args, mode, args.max_num_seqs)


def shifted(prompts: list[list[int]], k: int) -> list[list[int]]:
    """The prompts with their first token id changed (k = 0: unchanged), so no KV block hash matches the
    original's; lengths are kept. Token ids stay in [0, 10000]."""
    if k == 0:
        return prompts
    return [[(p[0] + 997 * k) % 10001] + p[1:] for p in prompts]


def warm_up(llm: Any, SamplingParams: Any, max_input_len: int) -> float:
    """One short generate, then 3 prompts of different lengths (< max_input_len) in one batch; returns seconds.

    The warm-up prompts come from their own RNGs (ids in [0, 10000] like the workload's): a 16-token KV block
    of theirs matching one of the workload's is a 1e-64 event, so they cannot seed the prefix cache.
    """
    t0 = time.perf_counter()
    llm.generate(common.random_prompts(1, 16, seed=12345), SamplingParams(temperature=TEMPERATURE, max_tokens=8,
                 ignore_eos=True), use_tqdm=False)
    lens = sorted({max(2, min(max_input_len, n)) for n in (37, 300, 777)})
    prompts = [common.random_prompts(1, n, seed=777 + n)[0] for n in lens]
    llm.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_tokens=4, ignore_eos=True), use_tqdm=False)
    common.synchronize()
    return time.perf_counter() - t0


def engine_stats(llm: Any) -> dict[str, Any] | None:
    """``llm.stats()`` (the engine's cumulative prefill/decode token and second counters), or None if absent."""
    fn = getattr(llm, "stats", None)
    if not callable(fn):
        return None
    try:
        return dict(fn())
    except Exception:  # noqa: BLE001
        return None


def run_mode(mode: str, args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int],
             llm: Any = None, engine_kwargs: dict[str, Any] | None = None, init_s: float | None = None
             ) -> dict[str, Any]:
    """Build one engine, warm it up, time the workload (and the prefill-only run); release the engine.

    Args:
        llm: a prebuilt engine of this ``mode``; when given, it is neither built nor shut down here,
            ``engine_kwargs`` (the keywords it was built with) are recorded in ``engine_config``, ``init_s`` is
            the caller's build time of that engine (None if not given; the build is shared with the caller's other
            measurements) and ``prebuilt_engine`` is True.

    Returns:
        dict: output_tokens_per_s (median over repetitions), seconds, seconds_all, output_tokens, init_s,
        warmup_s, prefill_s / decode_s (engine step timers, or an estimate), total_tokens_per_s (prompt + output
        tokens / s), engine config, num_kvcache_blocks when known.

    Raises:
        RuntimeError: the engine returned a different number of tokens than requested (ignore_eos is set, so
        each request must produce exactly its max_tokens).
    """
    from nanovllm import SamplingParams

    llm, kw, res, own = common.mode_engine(mode, args.model, "throughput", lambda: llm_kwargs(args, mode), llm,
                                           engine_kwargs, init_s)
    try:
        res["warmup_s"] = round(warm_up(llm, SamplingParams, args.max_input_len), 2)
        print(f"[{mode}] warm-up {res['warmup_s']} s", flush=True)
        sps = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
        times: list[float] = []
        splits: list[dict[str, float]] = []
        for k in range(args.repeat):
            st0 = engine_stats(llm)
            outs, dt = common.timed(llm.generate, shifted(prompts, k), sps, use_tqdm=False)
            st1 = engine_stats(llm)
            n_out = sum(len(o["token_ids"]) for o in outs)
            if n_out != sum(max_tokens):
                bad = [(i, len(o["token_ids"]), m) for i, (o, m) in enumerate(zip(outs, max_tokens))
                       if len(o["token_ids"]) != m][:5]
                raise RuntimeError(f"engine produced {n_out} tokens, expected {sum(max_tokens)} "
                                   f"(first mismatches (index, got, want): {bad})")
            hits = sum(int(o.get("num_cached_tokens") or 0) for o in outs)
            if hits:
                print(f"[{mode}] warning: {hits} prompt tokens came from the prefix cache", flush=True)
            times.append(dt)
            if st0 is not None and st1 is not None:
                splits.append({key: st1[key] - st0[key] for key in st1 if isinstance(st1[key], (int, float))
                               and isinstance(st0.get(key), (int, float))})
            print(f"[{mode}] run {k}: {n_out} tokens in {dt:.2f} s = {n_out / dt:,.0f} tok/s", flush=True)
        dt = common.median(times)
        n_out, n_in = sum(max_tokens), sum(len(p) for p in prompts)
        res.update(output_tokens=n_out, prompt_tokens=n_in, seconds=round(dt, 3),
                   seconds_all=[round(t, 3) for t in times], output_tokens_per_s=round(n_out / dt, 1),
                   total_tokens_per_s=round((n_out + n_in) / dt, 1))
        if splits:
            # the repetition whose time is the median (for an even count: the faster of the two middle ones)
            sp = splits[sorted(range(len(times)), key=lambda i: times[i])[(len(times) - 1) // 2]]
            pre, dec = sp.get("prefill_seconds", 0.0), sp.get("decode_seconds", 0.0)
            res.update(prefill_s=round(pre, 3), decode_s=round(dec, 3),
                       prefill_tokens_per_s=round(sp.get("prefill_tokens", 0) / pre, 1) if pre > 0 else None,
                       decode_tokens_per_s=round(sp.get("decode_tokens", 0) / dec, 1) if dec > 0 else None,
                       engine_stats_delta={k: round(v, 4) if isinstance(v, float) else v for k, v in sp.items()},
                       split_method="engine step timers (LLM.stats() before/after the timed generate); "
                                    "seconds - prefill_s - decode_s = time outside steps")
        elif not args.no_split:
            # no engine counters: time the prefill alone on same-length prompts with other ids
            _, pre = common.timed(llm.generate, shifted(prompts, args.repeat + 1),
                                  SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=1),
                                  use_tqdm=False)
            res.update(prefill_s=round(pre, 3), decode_s=round(max(dt - pre, 0.0), 3),
                       prefill_tokens_per_s=round(n_in / pre, 1),
                       split_method="estimate: prefill_s = time of generate(max_tokens=1) on same-length prompts "
                                    "with other ids; decode_s = seconds - prefill_s")
            print(f"[{mode}] prefill-only run {pre:.2f} s", flush=True)
        try:
            res["kv_cache_usage_after"] = round(float(llm.kv_cache_usage()), 4)
        except Exception:  # noqa: BLE001 - optional
            pass
        res["engine_config"] = common.engine_config(llm, kw)
    finally:
        if own:
            common.shutdown_engine(llm)
            del llm
            common.free_accelerator_memory(report=True)
    return res


def run_peer(args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    """transformers ``generate`` on the first ``args.peer_num_seqs`` requests as one left-padded batch.

    Returns:
        dict: output_tokens_per_s (useful tokens / s), useful_output_tokens (sum of the subset's max_tokens),
        generated_tokens (rows * max(max_tokens)), seconds, subset description, versions, peak memory.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    n = min(args.peer_num_seqs, len(prompts))
    sub_p, sub_m = prompts[:n], max_tokens[:n]
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"\n=== peer: transformers {transformers.__version__} generate, {n} requests, {dtype}, sdpa", flush=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    load_s = time.perf_counter() - t0
    width = max(len(p) for p in sub_p)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(sub_p):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gen = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    new = max(sub_m)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            model.generate(ids[:2, -32:], attention_mask=mask[:2, -32:], max_new_tokens=8, **gen)  # warm-up
            out, dt = common.timed(model.generate, ids, attention_mask=mask, max_new_tokens=new,
                                   min_new_tokens=new, **gen)
        got = int(out.shape[1] - width)
    finally:
        del model
        common.free_accelerator_memory()
    useful = sum(sub_m)
    res = {
        "peer": "transformers.generate",
        "transformers": transformers.__version__,
        "subset": f"the first {n} of the {len(prompts)} workload requests, one left-padded batch "
                  f"(prompt lengths {min(len(p) for p in sub_p)}-{width}, max_tokens {min(sub_m)}-{new})",
        "num_seqs": n,
        "settings": f"eager, attn_implementation=sdpa, {str(dtype).replace('torch.', '')}, dynamic cache, "
                    f"do_sample temperature={TEMPERATURE} top_k=0 top_p=1, EOS ignored (min_new_tokens=max_new_tokens)",
        "useful_output_tokens": useful,
        "generated_tokens": n * got,
        "seconds": round(dt, 3),
        "load_s": round(load_s, 2),
        "output_tokens_per_s": round(useful / dt, 1),
        "note": "every row runs max(max_tokens) steps; only each request's own max_tokens count as output",
    }
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"[peer] {useful} useful tokens in {dt:.2f} s = {useful / dt:,.1f} tok/s", flush=True)
    return res


def workload(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    """The workload of ``args`` (see :func:`common.nano_vllm_workload`).

    Raises:
        SystemExit: the checkpoint's vocabulary does not hold the workload's token ids (up to 10000).
    """
    hf_cfg = common.load_hf_config(args.model)
    if hf_cfg and int(hf_cfg.get("vocab_size", 10**9)) <= 10000:
        raise SystemExit(f"{args.model}: vocab_size {hf_cfg['vocab_size']} <= 10000, but the workload's token ids "
                         "go up to 10000; build a checkpoint with a larger vocabulary")
    return common.nano_vllm_workload(args.num_seqs, args.seed, args.max_input_len, args.max_output_len,
                                     args.min_input_len, args.min_output_len)


def new_result(args: argparse.Namespace, modes: list[str], prompts: list[list[int]], max_tokens: list[int],
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document before any mode runs: workload, model config, floor (``meta``: default
    :func:`common.run_metadata`)."""
    hf_cfg = common.load_hf_config(args.model)
    sizes = common.qwen3_sizes(hf_cfg) if hf_cfg else {}
    tp = args.tensor_parallel_size
    floor = common.bandwidth_floor([len(p) for p in prompts], max_tokens,
                                   **({k: sizes[k] for k in ("weight_bytes", "kv_bytes_per_token", "flop_per_token")}
                                      if sizes else {}),
                                   bandwidth=common.H200_BANDWIDTH_BYTES_PER_S * tp,
                                   peak_flops=common.H200_PEAK_BF16_FLOP_PER_S * tp)
    floor["note"] = (f"H200 constants x tensor_parallel_size={tp}; model sizes from {args.model}/config.json "
                     f"(bf16: {sizes.get('params', 0) / 1e6:.1f} M parameters)")
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "workload": {"description": "nano-vLLM bench.py: random.seed(seed); prompts [randint(0, 10000) for _ in "
                                    "range(randint(100, max_input_len))] x num_seqs, then max_tokens "
                                    "randint(100, max_output_len) x num_seqs; temperature 0.6, ignore_eos",
                     "num_seqs": args.num_seqs, "seed": args.seed, "max_input_len": args.max_input_len,
                     "max_output_len": args.max_output_len, "prompt_tokens": sum(len(p) for p in prompts),
                     "output_tokens": sum(max_tokens)},
        "model": args.model,
        "model_config": {k: hf_cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim", "intermediate_size",
                                                    "vocab_size", "tie_word_embeddings", "dtype")},
        "headline_mode": modes[0] if modes else None,
        "output_tokens_per_s": None,
        "modes": {},
        "floor": floor,
        "peer": None,
        "meta": common.run_metadata() if meta is None else meta,
    }
    for key in ("min_input_len", "min_output_len"):  # recorded only when not nano-vLLM's 100
        if getattr(args, key) != 100:
            result["workload"][key] = getattr(args, key)
    return result


def update_derived(result: dict[str, Any]) -> None:
    """(Re)compute the headline figure and the derived ratios: each mode's fraction_of_floor and
    speedup_vs_peer, and fusion_speedup (fusion / nofusion tokens/s) when both modes ran."""
    floor = result["floor"]
    head = result["modes"].get(result["headline_mode"], {})
    result["output_tokens_per_s"] = head.get("output_tokens_per_s")
    peer_tps = (result["peer"] or {}).get("output_tokens_per_s")
    for m in result["modes"].values():
        tps = m.get("output_tokens_per_s")
        if tps:
            m["fraction_of_floor"] = round(tps / floor["output_tokens_per_s"], 4)
            if peer_tps:
                m["speedup_vs_peer"] = round(tps / peer_tps, 2)
    if "fusion" in result["modes"] and "nofusion" in result["modes"]:
        a = result["modes"]["fusion"].get("output_tokens_per_s")
        b = result["modes"]["nofusion"].get("output_tokens_per_s")
        if a and b:
            result["fusion_speedup"] = round(a / b, 4)


def print_summary(result: dict[str, Any]) -> None:
    """The throughput table: every mode, the peer, the floor; and the fusion on / off ratio."""
    floor = result["floor"]
    rows = []
    for name, m in result["modes"].items():
        rows.append([f"nano-vllm-coconut ({name})", m.get("output_tokens_per_s"), m.get("seconds"),
                     m.get("prefill_s"), m.get("decode_s"), m.get("output_tokens"), m.get("fraction_of_floor"),
                     m.get("error", "") or ("skipped" if m.get("skipped") else "")])
    if result["peer"]:
        p = result["peer"]
        rows.append([f"transformers generate (first {p.get('num_seqs', '?')} req.)", p.get("output_tokens_per_s"),
                     p.get("seconds"), None, None, p.get("useful_output_tokens"),
                     (p.get("output_tokens_per_s") or 0) / floor["output_tokens_per_s"] if p.get("output_tokens_per_s")
                     else None, p.get("error", "") or ("skipped" if p.get("skipped") else "")])
    rows.append(["bandwidth floor (probes/floor.py)", floor["output_tokens_per_s"], floor["floor_s"],
                 floor["prefill_floor_s"], floor["decode_floor_s"], floor["output_tokens"], 1.0, ""])
    common.print_table(["engine", "output tok/s", "total s", "prefill s", "decode s", "output tokens",
                        "of floor", "error"], rows,
                       title=f"Throughput, {result['workload']['num_seqs']} requests, {result['meta']['gpu']['name']}")
    if "fusion_speedup" in result:
        print(f"fusion on / off: {result['fusion_speedup']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    """Run the selected modes (and the peer), write the JSON, print the table. Returns the exit status."""
    args = parse_args(argv)
    modes = selected_modes(args)
    prompts, max_tokens = workload(args)
    result = new_result(args, modes, prompts, max_tokens)
    floor = result["floor"]
    print(f"workload: {args.num_seqs} requests, {result['workload']['prompt_tokens']:,} prompt tokens, "
          f"{result['workload']['output_tokens']:,} output tokens; floor {floor['output_tokens_per_s']:,.0f} tok/s",
          flush=True)
    failures: list[str] = []
    for mode in modes:
        try:
            result["modes"][mode] = run_mode(mode, args, prompts, max_tokens)
        except Exception as e:  # noqa: BLE001 - record and go on with the other modes / the peer
            import traceback
            traceback.print_exc()
            result["modes"][mode] = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
            failures.append(mode)
            common.free_accelerator_memory()
        head = result["modes"].get(modes[0], {})
        result["output_tokens_per_s"] = head.get("output_tokens_per_s")
        common.write_json(args.out, result)
    if args.peer:
        try:
            result["peer"] = run_peer(args, prompts, max_tokens)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            result["peer"] = {"error": f"{type(e).__name__}: {e}"}
            failures.append("peer")
    update_derived(result)
    path = common.write_json(args.out, result)
    print_summary(result)
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
