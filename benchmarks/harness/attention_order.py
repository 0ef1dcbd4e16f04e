"""Decode attention on a batch of unequal contexts: batch order against longest first, and the split count.

The offline workload decodes batches whose contexts differ (prompts of 100-1024 tokens, 100-1024 output tokens).
The split kernel (:mod:`nanovllm.kernels.decode_attention`) starts one program per (sequence, kv head, split), in
batch order, each one's work proportional to its context; with the batch in arbitrary order the longest programs
may start last and run alone at the end. This benchmark times one layer's decode attention of the Qwen3-0.6B shape
(16 q heads, 8 kv heads, head_dim 128, bf16, block size 16, block table as wide as ``--max-model-len`` as in the
engine's CUDA graphs, blocks randomly permuted) per batch size, with contexts ``randint(100, 1024) +
randint(0, 1024)`` (seed 0), in these variants:

- ``batch``: the contexts in drawn order, the kernel's own split count (:func:`choose_num_splits`);
- ``longest``: the same rows sorted longest first (the scheduler's :func:`decode_order`);
- ``longest-x2`` / ``longest-x4``: sorted, two / four times the split count.

Each variant is one CUDA graph of ``--calls`` calls; the graphs are replayed in alternation ``--rounds`` times;
reported per variant: the median microseconds per call, the K/V bytes read over that time against the copy
bandwidth measured in the same process (``fraction_of_copy``), and the median per-round ratio to ``batch``. The
outputs of every variant are checked against ``batch``'s (rows permuted back): bitwise for ``longest``, relative
error for the others.

Usage (GPU)::

    python -m benchmarks.harness.attention_order --out benchmarks/results/h100/attention-order.json
"""
from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import provenance, results_io, timing

H, HKV, D, BLOCK = 16, 8, 128, 16
KV_BYTES_PER_TOKEN_LAYER = 2 * HKV * D * 2  # K and V, bf16


def contexts(batch: int, seed: int = 0) -> list[int]:
    """``batch`` context lengths, each ``randint(100, 1024) + randint(0, 1024)`` from ``random.Random(seed)``."""
    rng = random.Random(seed * 7919 + batch)
    return [rng.randint(100, 1024) + rng.randint(0, 1024) for _ in range(batch)]


def build_case(ctx: list[int], width: int, device: str, dtype: torch.dtype, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged cache holding ``ctx`` contexts: (q [B, H, D], k_cache, v_cache [N, BLOCK, HKV, D], block_tables
    int32 [B, width] padded with -1 and pointing at randomly permuted blocks, context_lens int32 [B])."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // BLOCK) for c in ctx]
    n = sum(need)
    perm = torch.randperm(n, generator=g).to(torch.int32)
    bt = torch.full((len(ctx), width), -1, dtype=torch.int32)
    at = 0
    for i, k in enumerate(need):
        bt[i, :k] = perm[at:at + k]
        at += k
    k_cache = torch.randn(n, BLOCK, HKV, D, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(n, BLOCK, HKV, D, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(len(ctx), H, D, generator=g).to(device=device, dtype=dtype)
    return q, k_cache, v_cache, bt.to(device), torch.tensor(ctx, dtype=torch.int32, device=device)


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bt: torch.Tensor, lens: torch.Tensor,
             ctx: list[int]) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    """The variants' calls (each returns its output, rows in its own order) and the permutation ``order`` that
    sorts the batch longest first (row i of a sorted output is row order[i] of the batch)."""
    from fusion_pass.launch import sm_count
    from nanovllm.kernels.decode_attention import choose_num_splits, decode_attention_triton

    order = torch.tensor(sorted(range(len(ctx)), key=lambda i: -ctx[i]), device=q.device)
    qs, bts, ls = q[order].contiguous(), bt[order].contiguous(), lens[order].contiguous()
    s = choose_num_splits(len(ctx), HKV, bt.shape[1] * BLOCK, sm_count(q.device))
    scale = D ** -0.5
    out = {name: torch.empty_like(q) for name in ("batch", "longest", "longest-x2", "longest-x4")}
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "batch": lambda: decode_attention_triton(q, k, v, bt, lens, scale, out=out["batch"]),
        "longest": lambda: decode_attention_triton(qs, k, v, bts, ls, scale, out=out["longest"]),
        "longest-x2": lambda: decode_attention_triton(qs, k, v, bts, ls, scale, num_splits=2 * s,
                                                      out=out["longest-x2"]),
        "longest-x4": lambda: decode_attention_triton(qs, k, v, bts, ls, scale, num_splits=4 * s,
                                                      out=out["longest-x4"]),
    }
    return calls, order


def time_alternating(calls: dict[str, Callable[[], Any]], n_calls: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per call of each variant: one CUDA graph of ``n_calls`` calls per variant, replayed in
    alternation ``rounds`` times (the order rotates each round)."""
    graphs = {name: timing.capture_graph(fn, n_calls) for name, fn in calls.items()}
    torch.cuda.synchronize()
    names = list(graphs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 2):
        for name in names[r % len(names):] + names[:r % len(names)]:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[name].replay()
            b.record()
            b.synchronize()
            if r >= 2:
                times[name].append(a.elapsed_time(b) * 1e3 / n_calls)
    return times


def run(batches: list[int], max_model_len: int, n_calls: int, rounds: int, extra: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Every batch size's variants (plus ``extra``: name -> f(q, k, v, bt, lens) -> output, batch order)."""
    bw = timing.copy_bandwidth()["bytes_per_s"]
    res: dict[str, Any] = {"copy_bandwidth_tb_s": round(bw / 1e12, 3), "batches": {}}
    for b in batches:
        ctx = contexts(b)
        q, k, v, bt, lens = build_case(ctx, max_model_len // BLOCK, "cuda", torch.bfloat16)
        calls, order = variants(q, k, v, bt, lens, ctx)
        for name, f in (extra or {}).items():
            calls[name] = (lambda f=f: f(q, k, v, bt, lens))
        ref = calls["batch"]().float()
        checks: dict[str, Any] = {}
        for name, fn in calls.items():
            o = fn().float()
            o = o[torch.argsort(order)] if name.startswith("longest") else o
            checks[name] = {"bitwise_equal": bool(torch.equal(o, ref)),
                            "rel_err": float((o - ref).norm() / ref.norm())}
        times = time_alternating(calls, n_calls, rounds)
        nbytes = sum(ctx) * KV_BYTES_PER_TOKEN_LAYER
        base = times["batch"]
        rows = {}
        for name, ts in times.items():
            us = timing.median(ts)
            rows[name] = {"us": round(us, 2), "tb_s": round(nbytes / (us * 1e-6) / 1e12, 3),
                          "fraction_of_copy": round(nbytes / (us * 1e-6) / bw, 3),
                          "ratio_to_batch": round(timing.median([t / t0 for t, t0 in zip(ts, base)]), 4),
                          **checks[name]}
        res["batches"][str(b)] = {"contexts_tokens": sum(ctx), "max_context": max(ctx), "kv_bytes": nbytes,
                                  "floor_us": round(nbytes / bw * 1e6, 2), "variants": rows}
        print(f"batch {b:4d} ({sum(ctx)} tokens, floor {nbytes / bw * 1e6:.1f} us): " + ", ".join(
            f"{n} {r['us']:.1f} us ({r['fraction_of_copy']:.3f}, x{r['ratio_to_batch']:.3f})" for n, r in rows.items()),
            flush=True)
        del q, k, v, bt, lens, calls
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None, extra: dict[str, Any] | None = None) -> int:
    """Run the benchmark and write ``--out``; returns 0 (2 without CUDA)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="16,32,64,128,256")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--calls", type=int, default=10, help="calls per CUDA graph")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=results_io.default_out("attention-order"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the attention-order benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    res = {**provenance.header(argv, module="benchmarks.harness.attention_order"),
           **run([int(b) for b in args.batches.split(",")], args.max_model_len, args.calls, args.rounds, extra)}
    results_io.write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
