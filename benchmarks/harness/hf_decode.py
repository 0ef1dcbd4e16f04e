"""transformers models compiled by Inductor and by coconut under the same torch.compile mode, side by side.

    python -m benchmarks.harness.hf_decode --out benchmarks/results/h100/hf-decode.json          # GPU, ~4 min
    python -m benchmarks.harness.hf_decode --device cpu --tiny --out /tmp/hf-decode-smoke.json   # CPU smoke

Models (random weights, built with transformers' own config classes; no checkpoint needed): "qwen3-0.6b" (hidden
1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 3072, vocab 151936, tied) and "llama-3.2-1b"
(hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64, intermediate 8192, vocab 128256, tied, llama3 RoPE);
plus "smollm2" from `--smollm2-dir` (a transformers folder with real weights). `--tiny`: 1-layer versions of the
same architectures (fp32; for the CPU smoke test).

Two parts per (model, mode, batch), each run with both backends:
- step: one decode forward (one new token per sequence) against a static KV cache holding `--context` tokens.
  Mode "default": the compiled forward captured in one CUDA graph here and replayed (coconut with option
  ``coconut.launch`` = "op", since it replays in a graph Inductor does not know of); "reduce-overhead": Inductor's
  CUDA-graph trees replay it. Timed as `--pairs` pairs of chunks of `--replays` calls, Inductor then coconut in
  each pair; per call = chunk time / replays (CUDA events). Reported: the medians and each pair's ratio
  inductor/coconut (> 1: coconut faster). Also the argmax agreement of the two backends' logits.
- generate: `model.generate` with a static cache and generate's own compile of the decode step (CompileConfig with
  the backend and mode), greedy, `--new-tokens` tokens after a `--prompt-len` prompt; one warm-up call (compiles),
  then `--generate-runs` timed calls per backend, interleaved, each backend on its own copy of the model;
  tokens/s = batch * new tokens / median seconds (prefill included). Reported: both tokens/s, their ratio, each
  interleaved pair's ratio (the spread), whether the greedy tokens are equal, and how many fused sites Inductor
  launches itself and how many were left to Inductor (``coconut.launch``, docs/backend.md).
Rows run in priority order (every step row before any generate row; within a part batch 1, then 8, then 32) until
`--budget-s` is spent; the rest are recorded as skipped. Compile times are reported per row and never enter a timing.

Output JSON: {"meta": {gpu, torch, triton, transformers, date, git_commit, command, args}, "rows": [...],
"summary": {"step_batch1_speedup": {model/mode: ratio}, "step_worst_ratio": {model/mode: min over batches},
"generate_batch1_speedup": {...}}, "coconut_dispatch": the kernel variant measured fastest per site shape}.
Imports only torch, transformers, fusion_pass and the standard library.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch

BACKENDS = ("inductor", "coconut")

#: Architecture shapes (public configs of Qwen/Qwen3-0.6B and meta-llama/Llama-3.2-1B).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}
TINY = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, vocab_size=256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's command-line flags."""
    a = parser.add_argument
    a("--out", default=None, help="JSON file to write (default: print only)")
    a("--device", default="cuda", choices=["cuda", "cpu"])
    a("--tiny", action="store_true", help="1-layer models with hidden size 64, float32 (CPU smoke test)")
    a("--models", default="qwen3-0.6b,llama-3.2-1b", help="comma list of " + ", ".join(SHAPES) + ", smollm2")
    a("--smollm2-dir", default=None, help="transformers folder of SmolLM2 (adds the model 'smollm2')")
    a("--modes", default="default,reduce-overhead", help="torch.compile modes, each run with both backends")
    a("--batches", default="1,8,32")
    a("--parts", default="step,generate")
    a("--context", type=int, default=512, help="tokens in the static KV cache before the timed decode step")
    a("--replays", type=int, default=100, help="decode-step calls per timed chunk")
    a("--pairs", type=int, default=7, help="timed (inductor, coconut) chunk pairs per step row")
    a("--prompt-len", type=int, default=128)
    a("--new-tokens", type=int, default=64)
    a("--generate-runs", type=int, default=3, help="timed generate calls per backend")
    a("--budget-s", type=float, default=240.0, help="stop starting new rows after this many seconds")
    a("--fullgraph", type=int, default=1, choices=[0, 1], help="torch.compile's fullgraph for both backends")
    a("--seed", type=int, default=0)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("context", "replays", "pairs", "prompt_len", "new_tokens", "generate_runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device (use --device cpu --tiny for the smoke run)")
    for m in _list(args.models):
        if m not in SHAPES and m != "smollm2":
            raise ValueError(f"--models: unknown model {m!r} (known: {', '.join(SHAPES)}, smollm2)")
        if m == "smollm2" and not args.smollm2_dir:
            raise ValueError("--models smollm2 needs --smollm2-dir")


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """A random-weight (or, for smollm2, loaded) causal LM on args.device, bf16 on CUDA, fp32 on the CPU."""
    import transformers

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if name == "smollm2":
        return transformers.AutoModelForCausalLM.from_pretrained(args.smollm2_dir, dtype=dtype).to(args.device).eval()
    kw = dict(SHAPES[name])
    arch = kw.pop("arch")
    if args.tiny:
        kw.update(TINY)
    cls, cfg = ((transformers.Qwen3ForCausalLM, transformers.Qwen3Config) if arch == "qwen3"
                else (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = cls(cfg(**kw))
    return model.to(dtype).eval()


def _forward_kwargs(model: torch.nn.Module, cache: Any, start: int, n: int, batch: int) -> dict[str, Any]:
    """Keyword arguments of a forward of n new tokens per sequence at position `start` (transformers 5.x names:
    the cache is `cache` on newer releases and `past_key_values` on older ones; `cache_position` where accepted)."""
    dev = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"use_cache": True,
                          "position_ids": torch.arange(start, start + n, device=dev).expand(batch, n).contiguous()}
    kw["cache" if "cache" in params else "past_key_values"] = cache
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(start, start + n, device=dev)
    return kw


def _rewind(cache: Any, length: int) -> None:
    """Set a static cache's filled length back to `length` (newer transformers keep it in a device tensor that
    each forward advances in place; older ones take cache_position as an input and need nothing)."""
    with torch.inference_mode():  # the tensor may be an inference tensor (created by a forward in inference mode)
        for layer in getattr(cache, "layers", []):
            t = getattr(layer, "cumulative_length", None)
            if isinstance(t, torch.Tensor):
                t.fill_(length)


class _Clock:
    """Wall time of a callable: CUDA events on the GPU, perf_counter on the CPU (milliseconds)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def ms(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def _step_runner(model: torch.nn.Module, backend: str, mode: str, cache: Any, args: argparse.Namespace,
                 batch: int) -> tuple[Callable[[int], None], Callable[[], torch.Tensor], dict[str, Any]]:
    """Compile the decode step with `backend` / `mode`, warm it up, and (mode default on CUDA) capture it.

    Returns (run(n): n calls from the cache's current length, last_logits(), info) where info has compile_s and
    fused_sites.
    """
    import fusion_pass

    kw = _forward_kwargs(model, cache, args.context, 1, batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(args.seed + 1))
    trees = mode in ("reduce-overhead", "max-autotune") and args.device == "cuda"
    chosen: Any = backend
    compile_mode: Optional[str] = None if mode == "default" else mode
    if backend == "coconut" and args.device == "cuda" and not trees:
        # the step is replayed in a CUDA graph captured here (mode "default" or "max-autotune-no-cudagraphs"), which
        # Inductor does not know of: tell coconut (launch "op", as the engine does), else it would write the sites
        # out as Inductor launches without PDL. make_backend takes the mode with the option (torch.compile does not
        # take both).
        chosen = fusion_pass.make_backend(compile_mode, {"coconut.launch": "op"})
        compile_mode = None
    compiled = torch.compile(model.forward, backend=chosen, mode=compile_mode, fullgraph=bool(args.fullgraph))
    out: dict[str, torch.Tensor] = {}

    def call() -> None:
        if trees:
            torch.compiler.cudagraph_mark_step_begin()
        out["logits"] = compiled(input_ids=ids, **kw).logits

    before = fusion_pass.fused_site_count()
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(3):  # compile; CUDA-graph trees warm up, then record
            _rewind(cache, args.context)
            call()
    if args.device == "cuda":
        torch.cuda.synchronize()
    info = {"compile_s": round(time.perf_counter() - t, 2), "fused_sites": fusion_pass.fused_site_count() - before}
    graph: Optional[torch.cuda.CUDAGraph] = None
    if args.device == "cuda" and not trees:
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            call()

    def run(n: int) -> None:  # the caller rewinds the cache first (outside its timing)
        with torch.inference_mode():
            for _ in range(n):
                graph.replay() if graph is not None else call()

    def last_logits() -> torch.Tensor:  # a copy: CUDA-graph trees reuse output memory on the next run
        _rewind(cache, args.context)
        run(1)
        return out["logits"][:, -1].float().clone()

    return run, last_logits, info


def _prefill(model: torch.nn.Module, cache: Any, args: argparse.Namespace, batch: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(args.seed))
    with torch.inference_mode():
        model(input_ids=ids, **_forward_kwargs(model, cache, 0, args.context, batch))


def pretune(model: torch.nn.Module, batch: int, args: argparse.Namespace) -> None:
    """Measure coconut's kernel choice for the model's weight groups (q/k/v, gate/up, lm_head) at `batch` rows before
    anything compiles or captures (the backend also does it at compile time, but not for a graph served from the
    FX-graph cache)."""
    import fusion_pass

    if args.device != "cuda":
        return
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, inter = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
    groups = [(q, kv, kv), (inter, inter), (c.vocab_size,)]  # the weight groups: q/k/v, gate/up, lm_head
    fusion_pass.pretune([(batch, sum(w), c.hidden_size, w) for w in groups], dtype=next(model.parameters()).dtype,
                        device=args.device)


def step_row(model: torch.nn.Module, mode: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """The decode-step comparison of one (model, mode, batch); see the module docstring."""
    import transformers

    pretune(model, batch, args)
    length = args.context + args.replays + 8
    try:  # transformers 5.x: sized lazily by the first forward
        cache = transformers.StaticCache(config=model.config, max_cache_len=length)
    except TypeError:  # releases that size it up front
        p = next(model.parameters())
        cache = transformers.StaticCache(config=model.config, max_cache_len=length, max_batch_size=batch,
                                         device=p.device, dtype=p.dtype)
    _prefill(model, cache, args, batch)
    runners = {b: _step_runner(model, b, mode, cache, args, batch) for b in BACKENDS}
    clock = _Clock(args.device)
    for b in BACKENDS:
        _rewind(cache, args.context)
        runners[b][0](2)  # warm-up replays
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    ratios = []
    for _ in range(args.pairs):
        pair = {}
        for b in BACKENDS:
            _rewind(cache, args.context)  # each chunk decodes the same positions
            pair[b] = clock.ms(lambda b=b: runners[b][0](args.replays)) / args.replays
        for b in BACKENDS:
            times[b].append(pair[b])
        ratios.append(pair["inductor"] / pair["coconut"])
    top = {b: runners[b][1]().argmax(-1) for b in BACKENDS}
    return {"part": "step", "batch": batch,
            "inductor_ms": round(statistics.median(times["inductor"]), 4),
            "coconut_ms": round(statistics.median(times["coconut"]), 4),
            "ratio_median": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
            "pair_ratios": [round(r, 4) for r in ratios],
            "argmax_agreement": (top["inductor"] == top["coconut"]).float().mean().item(),
            "compile_s": {b: runners[b][2]["compile_s"] for b in BACKENDS},
            "fused_sites": runners["coconut"][2]["fused_sites"]}


def generate_row(model: torch.nn.Module, mode: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """The generate comparison of one (model, mode, batch); see the module docstring."""
    import fusion_pass
    import transformers

    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(args.seed + 2))
    pretune(model, batch, args)
    # One model object per backend: transformers keeps ONE compiled forward per model and compiles it again
    # whenever generate is called with another CompileConfig, so alternating the backends on one model would time
    # recompilations (and, past Dynamo's recompile limit, an uncompiled forward). The copy shares no tensor.
    models = {b: model if i == 0 else copy.deepcopy(model) for i, b in enumerate(BACKENDS)}
    configs = {}
    for b in BACKENDS:
        cc = transformers.CompileConfig(backend=b, mode=mode, fullgraph=bool(args.fullgraph))
        cc._compile_all_devices = True  # generate compiles on CUDA only unless told (the CPU smoke run)
        configs[b] = cc

    def gen(b: str) -> torch.Tensor:
        with torch.inference_mode():
            return models[b].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=0, cache_implementation="static", compile_config=configs[b])

    clock = _Clock(args.device)
    compile_s, tokens, sites = {}, {}, 0
    graphs_before = len(fusion_pass.all_stats())
    for b in BACKENDS:
        before = fusion_pass.fused_site_count()
        t = time.perf_counter()
        tokens[b] = gen(b)[:, args.prompt_len:]  # compiles the decode step
        compile_s[b] = round(time.perf_counter() - t, 2)
        sites += fusion_pass.fused_site_count() - before
    secs: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for _ in range(args.generate_runs):
        for b in BACKENDS:
            secs[b].append(clock.ms(lambda b=b: gen(b)) / 1e3)
    tps = {b: batch * args.new_tokens / statistics.median(secs[b]) for b in BACKENDS}
    compiled = fusion_pass.all_stats()[graphs_before:]  # the graphs coconut compiled for this row
    return {"part": "generate", "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "inductor_tok_s": round(tps["inductor"], 2), "coconut_tok_s": round(tps["coconut"], 2),
            "ratio": round(tps["coconut"] / tps["inductor"], 4),
            "tokens_equal": bool(torch.equal(tokens["inductor"], tokens["coconut"])),
            "token_agreement": (tokens["inductor"] == tokens["coconut"]).float().mean().item(),
            "pair_ratios": [round(i / c, 4) for i, c in zip(secs["inductor"], secs["coconut"])],
            "compile_s": compile_s, "fused_sites": sites,
            "launched_sites": sum(g.get("launched", 0) for g in compiled),
            "left_to_inductor": sum(g.get("left_to_inductor", 0) for g in compiled)}


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:  # pragma: no cover
        commit = None
    return {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit, "command": " ".join([sys.executable, "-m", "benchmarks.harness.hf_decode"]
                                                      + sys.argv[1:]),
            "args": vars(args)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    step = [r for r in rows if r.get("part") == "step" and "ratio_median" in r]
    gen = [r for r in rows if r.get("part") == "generate" and "ratio" in r]
    key = lambda r: f"{r['model']}/{r['mode']}"  # noqa: E731
    worst: dict[str, float] = {}
    for r in step:
        worst[key(r)] = min(worst.get(key(r), float("inf")), r["ratio_median"])
    return {"step_batch1_speedup": {key(r): r["ratio_median"] for r in step if r["batch"] == 1},
            "step_worst_ratio": worst,
            "generate_batch1_speedup": {key(r): r["ratio"] for r in gen if r["batch"] == 1},
            "generate_tokens_equal": all(r["tokens_equal"] for r in gen) if gen else None,
            "goal": "batch-1 step speedup >= 1.25 and no batch slower than 0.99"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the rows in priority order within args.budget_s; returns the result dict (also written to args.out)."""
    import fusion_pass  # registers backend="coconut"

    _check_args(args)
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    t0 = time.perf_counter()
    plan = [(b, part, m, mode) for part in _list(args.parts) for b in map(int, _list(args.batches))
            for m in _list(args.models) for mode in _list(args.modes)]
    models: dict[str, torch.nn.Module] = {}
    rows: list[dict[str, Any]] = []
    last = 0.0
    for batch, part, name, mode in plan:
        row: dict[str, Any] = {"model": name, "mode": mode, "part": part, "batch": batch}
        spent = time.perf_counter() - t0
        if spent + last > args.budget_s:
            row["skipped"] = f"--budget-s {args.budget_s} (spent {spent:.0f} s)"
            rows.append(row)
            print(f"{name} {mode} {part} batch {batch}: skipped", flush=True)
            continue
        start = time.perf_counter()
        try:
            if name not in models:
                models[name] = build_model(name, args)
            torch._dynamo.reset()
            fn = step_row if part == "step" else generate_row
            row.update(fn(models[name], mode, batch, args))
        except Exception as e:  # one failed row must not lose the others
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        last = time.perf_counter() - start
        row["row_s"] = round(last, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"meta": _meta(args), "rows": rows, "summary": _summary(rows),
              "coconut_dispatch": fusion_pass.dispatch_table()}  # the kernel measured fastest per site shape
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["summary"], indent=1))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        parser.error(str(e))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
