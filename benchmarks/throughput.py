"""Offline throughput: the 256-request workload with fusion on and off, cold and warm builds, the first run of a
fresh engine against its second, the transformers peer and the bandwidth floor.

Workload (nano-vLLM's bench.py): ``random.seed(0)``; 256 prompts of ``randint(100, 1024)`` random token ids in
[0, 10000], then ``max_tokens = randint(100, 1024)`` per request; ``temperature=0.6, ignore_eos=True``; all
requests in one batch (142,827 prompt and 133,966 output tokens).

Each engine is built in a child process, twice per mode, with ``TRITON_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR``
pointed at one fresh temporary folder, and the engine's tuning file in it: the first build is the cold one (empty
caches, nothing tuned), the second the warm one (the caches and the tuning file the first filled). Each child runs
the workload twice on its fresh engine, with no warm-up run of its own (the engine's build-time warm-up on CUDA
counts in the build): ``first_run_over_second`` = tokens/s of run 1 / run 2. ``output_tokens_per_s`` is run 2 of the
warm child (output tokens / wall time of the run). Each run shifts the first token of every prompt, so the prefix
cache never serves one run's prompts to the next. Each run records its ``prefill_s`` and ``decode_s`` (the steps'
wall time) and ``host_s``, the host work of the steps (scheduling, a step's inputs before its first launch, the
postprocess; the engine's ``host_seconds``: the GPU waits for it except where async scheduling overlaps it). ``build_phases_s[kind][mode]`` (``kind`` "cold" / "warm") splits
that child's build into the engine's phases in seconds (the model runner's ``init_seconds``: load, pretune,
kv_cache, cudagraphs, prefill_cudagraphs, warm_up; those that ran on that device), also kept in the child's own
``init_seconds``.

Floor: per decode step, reading the weights and the live KV cache at the copy bandwidth measured in the same
run, or the step's FLOPs at the bf16 peak, whichever is longer; prefill at the bf16 peak. The transformers peer
(``--peer``) runs ``generate`` on the first ``--peer-num-seqs`` requests (a stated subset).

Writes ``benchmarks/results/<gpu>/throughput.json`` on a GPU (``$OUT/<gpu>/`` when ``OUT`` is set), a temp file
without CUDA; rewritten after every part, so a run cut short keeps what it measured.

Usage::

    python benchmarks/throughput.py --model /tmp/qwen3-0.6b --peer
    python benchmarks/throughput.py --model /tmp/qwen3-0.6b --no-cold --modes fusion      # warm build only
    python benchmarks/throughput.py --model /tmp/llama-3.2-1b --no-cold --into-key llama-3.2-1b   # a second model,
                                                                  # under its key of the existing throughput.json
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
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.harness import engine, floors, provenance, results_io, tables, timing, workloads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring). Exits with status 2 on a bad value."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b", help="checkpoint folder")
    ap.add_argument("--modes", default="fusion,nofusion", help=f"comma list of {sorted(engine.MODES)}")
    ap.add_argument("--no-cold", action="store_true",
                    help="skip the cold build: one child per mode with the caches as this machine has them")
    ap.add_argument("--peer", action="store_true", help="also time transformers generate on a subset")
    ap.add_argument("--peer-num-seqs", type=int, default=32, help="the peer runs the first N requests")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-input-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--min-output-len", type=int, default=100)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-scheduler-steps", type=int, default=None, help="LLM(num_scheduler_steps=...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no new child (or the peer) after this many seconds; skipped parts are recorded")
    ap.add_argument("--out", default=None, help="JSON path (default: results/<gpu>/throughput.json)")
    ap.add_argument("--into-key", default=None,
                    help="write the figures under this key of the JSON already at the output path, keeping its other "
                         "keys (e.g. llama-3.2-1b for a second checkpoint)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)       # internal: mode to build and run
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)   # internal: its JSON
    ap.add_argument("--child-tuning-file", default=None, help=argparse.SUPPRESS)  # internal: its tuning file
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in engine.MODES]
    if bad or not args.modes:
        ap.error(f"--modes: unknown or no mode {bad}; choose from {sorted(engine.MODES)}")
    if not 1 <= args.min_input_len <= args.max_input_len or not 1 <= args.min_output_len <= args.max_output_len:
        ap.error("need 1 <= --min-input-len <= --max-input-len and 1 <= --min-output-len <= --max-output-len")
    if args.num_seqs < 1 or args.peer_num_seqs < 1:
        ap.error("--num-seqs and --peer-num-seqs must be >= 1")
    return args


def workload(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    """The offline workload of ``args`` (:func:`workloads.nano_vllm_workload`); token ids capped below the
    checkpoint's vocabulary size for small test checkpoints."""
    prompts, max_tokens = workloads.nano_vllm_workload(args.num_seqs, args.seed, args.max_input_len,
                                                       args.max_output_len, args.min_input_len, args.min_output_len)
    high = engine.prompt_id_high(args.model)
    if high < 10000:
        prompts = [[t % (high + 1) for t in p] for p in prompts]
    return prompts, max_tokens


def child(args: argparse.Namespace) -> int:
    """Build one engine (mode ``args.child``), run the workload twice, write the child JSON. Returns 0."""
    from nanovllm import SamplingParams

    mode = args.child
    kw = engine.engine_kwargs(mode, dtype=args.dtype, max_model_len=args.max_model_len,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                              num_scheduler_steps=args.num_scheduler_steps, device=args.device)
    if args.child_tuning_file:  # a cold build starts without the tuning decisions of earlier runs too
        kw["tuning_file"] = args.child_tuning_file
    prompts, max_tokens = workload(args)
    high = engine.prompt_id_high(args.model)
    llm, build_s = engine.build(args.model, kw)
    sps = [SamplingParams(temperature=engine.TEMPERATURE, ignore_eos=True, max_tokens=m) for m in max_tokens]
    runs = []
    for k in range(2):
        t = engine.run_timed(llm, workloads.shifted(prompts, k + 1, high), sps)
        engine.check_counts(t, max_tokens, f"{mode} run {k + 1}")
        n = sum(max_tokens)
        runs.append({"output_tokens_per_s": round(n / t.wall_s, 1), "seconds": round(t.wall_s, 3),
                     "prefill_s": round(t.prefill_s, 3), "decode_s": round(t.decode_s, 3),
                     "host_s": round(t.host_s, 3), "cached_tokens": t.cached_tokens})
        print(f"[{mode}] run {k + 1}: {n} tokens in {t.wall_s:.2f} s = {n / t.wall_s:,.0f} tok/s", flush=True)
    res = {"mode": mode, "build_s": round(build_s, 2), "runs": runs, "llm_kwargs": kw,
           "num_kvcache_blocks": llm.config.num_kvcache_blocks,
           "first_run_over_second": round(runs[0]["output_tokens_per_s"] / runs[1]["output_tokens_per_s"], 4)}
    phases = getattr(llm.engine.model_runner, "init_seconds", None)  # absent on a tensor-parallel engine
    if isinstance(phases, dict):
        res["init_seconds"] = {k: round(v, 2) for k, v in phases.items()}
    engine.release(llm)
    results_io.write_json(args.child_out, res)
    return 0


def spawn(args: argparse.Namespace, argv: list[str], mode: str, cache_root: str | None) -> dict[str, Any]:
    """Run :func:`child` for ``mode`` in a subprocess (Triton and Inductor caches under ``cache_root`` when given);
    returns its JSON, or {"error": ...} when it failed."""
    fd, out = tempfile.mkstemp(suffix=".json", prefix=f"throughput-{mode}-")
    os.close(fd)
    env = dict(os.environ)
    if cache_root:
        env["TRITON_CACHE_DIR"] = os.path.join(cache_root, "triton")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, "inductor")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", mode, "--child-out", out]
    if cache_root:
        cmd += ["--child-tuning-file", os.path.join(cache_root, "tuning.json")]
    p = subprocess.run(cmd, env=env, cwd=provenance.REPO_ROOT)
    try:
        if p.returncode != 0:
            return {"error": f"child exited with status {p.returncode}"}
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def floor_of(args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, Any]:
    """The bandwidth floor of the workload at this GPU's measured copy bandwidth (see the module docstring)."""
    sizes = floors.qwen3_sizes(floors.load_hf_config(args.model))
    bw = floors.bandwidth_bytes_per_s()
    return floors.bandwidth_floor([len(p) for p in prompts], max_tokens, bandwidth=bw,
                                  **{k: sizes[k] for k in ("weight_bytes", "kv_bytes_per_token", "flop_per_token")})


def main(argv: list[str] | None = None) -> int:
    """Run every part, write the JSON after each, print a summary. Returns 1 if a part failed, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    path = results_io.results_path("throughput", args.out)
    base: dict[str, Any] = {}
    if args.into_key and os.path.exists(path):
        with open(path) as f:
            base = json.load(f)

    def save(res: dict[str, Any]) -> None:
        results_io.write_json(path, {**base, args.into_key: res} if args.into_key else res)

    prompts, max_tokens = workload(args)
    res: dict[str, Any] = {**provenance.header(argv, "benchmarks/throughput.py"),
                           "copy_bandwidth_tb_s": None, "floor_tokens_per_s": None,
                           "output_tokens_per_s": {}, "cold_build_s": {}, "warm_build_s": {},
                           "build_phases_s": {"cold": {}, "warm": {}},
                           "first_run_over_second": {}, "cold_first_run_over_second": {}, "fraction_of_floor": {},
                           "transformers_peer": None,
                           "workload": {"num_seqs": args.num_seqs, "prompt_tokens": sum(map(len, prompts)),
                                        "output_tokens": sum(max_tokens), "seed": args.seed,
                                        "input_len": [args.min_input_len, args.max_input_len],
                                        "output_len": [args.min_output_len, args.max_output_len]},
                           "model": args.model, "children": {},
                           "build_caches": ("the machine's own Triton / Inductor caches as earlier runs left them "
                                            "(--no-cold): warm_build_s is the build with them" if args.no_cold else
                                            "one fresh temporary folder per mode: the first build cold, the second "
                                            "warm")}
    failed = False
    child_argv = [a for a in argv if a != "--peer"]
    for mode in args.modes:
        root = None if args.no_cold else tempfile.mkdtemp(prefix=f"nanovllm-cache-{mode}-")
        for kind in (["warm"] if args.no_cold else ["cold", "warm"]):
            if time.perf_counter() - t0 > args.budget_s:
                res["children"][f"{mode}-{kind}"] = {"skipped": "budget"}
                continue
            r = spawn(args, child_argv, mode, root)
            res["children"][f"{mode}-{kind}"] = r
            if "error" in r:
                failed = True
            else:
                res[f"{kind}_build_s"][mode] = r["build_s"]
                if "init_seconds" in r:
                    res["build_phases_s"][kind][mode] = r["init_seconds"]
                if kind == "warm":
                    res["output_tokens_per_s"][mode] = r["runs"][1]["output_tokens_per_s"]
                    res["first_run_over_second"][mode] = r["first_run_over_second"]
                else:
                    res["cold_first_run_over_second"][mode] = r["first_run_over_second"]
            save(res)
    floor = floor_of(args, prompts, max_tokens)
    res["copy_bandwidth_tb_s"] = round(floor["bandwidth_bytes_per_s"] / 1e12, 4)
    res["floor_tokens_per_s"] = floor["output_tokens_per_s"]
    res["floor"] = floor
    for mode, tps in res["output_tokens_per_s"].items():
        res["fraction_of_floor"][mode] = round(tps / floor["output_tokens_per_s"], 4)
    tps = res["output_tokens_per_s"]
    if tps.get("fusion") and tps.get("nofusion"):
        res["fusion_over_nofusion"] = round(tps["fusion"] / tps["nofusion"], 4)
    save(res)
    if args.peer:
        if time.perf_counter() - t0 > args.budget_s:
            res["transformers_peer"] = {"skipped": "budget"}
        else:
            from benchmarks.harness.peer import run_peer
            try:
                res["transformers_peer"] = run_peer(args.model, prompts, max_tokens, args.peer_num_seqs, args.device)
            except Exception as e:  # noqa: BLE001 - recorded; the engine figures stand
                res["transformers_peer"] = {"error": f"{type(e).__name__}: {e}"}
                failed = True
    res["total_s"] = round(time.perf_counter() - t0, 1)
    save(res)
    rows = [[m, tps.get(m), res["fraction_of_floor"].get(m), res["cold_build_s"].get(m), res["warm_build_s"].get(m),
             res["first_run_over_second"].get(m)] for m in args.modes]
    if isinstance(res["transformers_peer"], dict) and "output_tokens_per_s" in res["transformers_peer"]:
        rows.append([f"transformers ({res['transformers_peer']['num_seqs']} req.)",
                     res["transformers_peer"]["output_tokens_per_s"], None, None, None, None])
    rows.append(["floor", res["floor_tokens_per_s"], 1.0, None, None, None])
    tables.print_table(["engine", "output tok/s", "of floor", "cold build s", "warm build s", "run1/run2"], rows,
                       title=f"Throughput, {args.num_seqs} requests, {res['gpu']}")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
