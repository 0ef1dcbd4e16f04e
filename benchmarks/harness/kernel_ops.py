"""The project's kernels through their public entry points, against their unfused paths and their bytes floors.

Only public API is used, so the benchmark does not change when the kernels' internals do:

- ``fusion``: ``torch.ops.coconut.add_rms_norm_linear`` (the fused op with its own dispatch) against the
  Inductor-compiled ``h = x + r; linear(rms_norm(h) * g, W)`` (what ``compile_fusion=False`` runs), at the
  Qwen3-0.6B sites qkv (4096 x 1024), gate_up (6144 x 1024) and lm_head (151936 x 1024);
- ``gemv``: ``torch.ops.nanovllm.linear_small_m`` (the engine's o_proj / down_proj) against the Inductor-compiled
  ``linear(act(x), W)``;
- ``attention``: ``nanovllm.kernels.decode_attention`` over a paged cache (block tables in a random block order),
  timed alone against its K/V bytes floor, checked against ``decode_attention_ref``.

Timing on CUDA: each callable is captured ``calls`` times into one CUDA graph and the two sides' graphs are
replayed in ``--pairs`` interleaved pairs (the order alternates); microseconds per call = graph time / calls,
median over pairs; ``speedup`` = the median of the per-pair ratios unfused / op. The weights (or K/V caches)
rotate over enough copies to exceed 128 MB, so they are read from memory and not from the L2, as in a real step.
Floor = bytes the call must move / this GPU's measured copy bandwidth. Without CUDA the same code times wall clock
on the CPU (smoke runs only; the figures mean nothing there).

Writes ``--out`` (benchmarks/kernels.py merges it into results/<gpu>/kernels.json).
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import floors, results_io
from .timing import median, pair_order

PARTS = ("fusion", "gemv", "attention")
FUSION_SITES: dict[str, tuple[int, int]] = {"qkv": (4096, 1024), "gate_up": (6144, 1024), "lm_head": (151936, 1024)}
GEMV_SITES: dict[str, tuple[int, int, str]] = {"o_proj": (1024, 2048, "none"), "down_proj": (1024, 3072, "silu_mul")}
ROTATE_BYTES = 128 << 20  # weights / caches rotate over copies totalling at least this much
EPS = 1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; exits with status 2 on a bad value."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--ms", default="1,2,4,8,16,32,64,256,1024", help="rows M of the fusion and gemv parts")
    p.add_argument("--sites", default=",".join([*FUSION_SITES, *GEMV_SITES]), help="sites of the fusion / gemv parts")
    p.add_argument("--batches", default="1,8,64,256", help="decode batch sizes of the attention part")
    p.add_argument("--contexts", default="512,2048", help="context lengths of the attention part")
    p.add_argument("--pairs", type=int, default=11, help="interleaved (unfused, op) pairs per case")
    p.add_argument("--calls", type=int, default=10, help="calls per CUDA graph (at least the number of copies)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--scale", type=float, default=1.0, help="divide every N and K by this (CPU smoke runs)")
    p.add_argument("--no-time", action="store_true", help="correctness only: errors against float64, no timing")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this many seconds")
    p.add_argument("--out", default=results_io.default_out("kernel-ops"))
    a = p.parse_args(argv)
    try:
        a.what = [w for w in a.what.split(",") if w]
        a.ms = [int(m) for m in a.ms.split(",") if m]
        a.sites = [s for s in a.sites.split(",") if s]
        a.batches = [int(b) for b in a.batches.split(",") if b]
        a.contexts = [int(c) for c in a.contexts.split(",") if c]
    except ValueError as e:
        p.error(str(e))
    bad = [w for w in a.what if w not in PARTS] + [s for s in a.sites if s not in {**FUSION_SITES, **GEMV_SITES}]
    if bad:
        p.error(f"unknown part or site {bad}")
    if min(a.ms + a.batches + a.contexts, default=1) < 1 or a.pairs < 1 or a.calls < 1 or a.scale < 1:
        p.error("--ms, --batches, --contexts, --pairs, --calls and --scale must be >= 1")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = getattr(torch, a.dtype)
    return a


def paired_us(fns: list[Callable[[int], Any]], calls: int, pairs: int, device: str) -> list[list[float]]:
    """Microseconds per call of each of two callables, per interleaved pair.

    ``fns[k](i)`` runs side k's ``i``-th call (``i`` picks the weight copy). On CUDA each side's ``calls`` calls
    are captured into one graph after 2 eager warm-up rounds and the graphs are replayed alternately; on the CPU
    each side's ``calls`` calls are timed with the wall clock.

    Returns:
        ``[side][pair]`` microseconds per call.
    """
    for fn in fns:  # warm-up: compiles, measures the op's dispatch, allocates outside any capture
        for i in range(calls):
            fn(i)
    out: list[list[float]] = [[], []]
    if device == "cuda":
        torch.cuda.synchronize()
        graphs = []
        for fn in fns:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(calls):
                    fn(i)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(i)
            g.replay()
            graphs.append(g)
        torch.cuda.synchronize()
        for p in range(pairs):
            for side in pair_order(p):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graphs[side].replay()
                b.record()
                b.synchronize()
                out[side].append(a.elapsed_time(b) * 1e3 / calls)
        del graphs
        return out
    for p in range(pairs):
        for side in pair_order(p):
            t0 = time.perf_counter()
            for i in range(calls):
                fns[side](i)
            out[side].append((time.perf_counter() - t0) * 1e6 / calls)
    return out


def summarize(case: dict[str, Any], times: list[list[float]], floor_bytes: float, bw: float) -> dict[str, Any]:
    """Add unfused_us / op_us (medians), speedup (median of per-pair unfused / op) and floor_us to ``case``."""
    un, op = times
    case.update(unfused_us=round(median(un), 3), op_us=round(median(op), 3),
                speedup=round(median([u / o for u, o in zip(un, op)]), 4),
                floor_us=round(floor_bytes / bw * 1e6, 3), pairs=len(op))
    case["op_fraction_of_floor"] = round(case["floor_us"] / case["op_us"], 4) if case["op_us"] > 0 else None
    return case


def copies_for(nbytes: int, calls: int) -> int:
    """Copies of an ``nbytes`` operand that together exceed :data:`ROTATE_BYTES` (at most ``calls``)."""
    return max(1, min(calls, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def fusion_part(args: argparse.Namespace, bw: float, t0: float) -> list[dict[str, Any]]:
    """The fused op against the Inductor-compiled unfused path, per site and M."""
    import fusion_pass  # noqa: F401 - registers the coconut ops

    dev, dt = args.device, args.dtype
    elem = torch.tensor([], dtype=dt).element_size()

    def unfused_fn(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x + r
        hf = h.float()
        a = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * g
        return F.linear(a, w), h

    unfused = torch.compile(unfused_fn, dynamic=True)
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for site in [s for s in args.sites if s in FUSION_SITES]:
        n, k = (max(16, d // int(args.scale)) for d in FUSION_SITES[site])
        nc = copies_for(n * k * elem, args.calls)
        ws = [(torch.randn(n, k, generator=gen) * 0.02).to(dev, dt) for _ in range(nc)]
        g = (1 + 0.1 * torch.randn(k, generator=gen)).to(dev, dt)
        for m in args.ms:
            case: dict[str, Any] = {"site": site, "M": m, "N": n, "K": k, "weight_copies": nc}
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({**case, "skipped": "budget"})
                continue
            try:
                x = torch.randn(m, k, generator=gen).to(dev, dt)
                r = torch.randn(m, k, generator=gen).to(dev, dt)
                y = torch.ops.coconut.add_rms_norm_linear(x, r, g, [ws[0]], [None], EPS)[0]
                h64 = x.double() + r.double()
                ref = F.linear(h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + EPS) * g.double(),
                               ws[0].double())
                case["rel_err"] = round(rel_err(y, ref), 6)
                if args.no_time:
                    rows.append(case)
                    print(case, flush=True)
                    continue
                times = paired_us([lambda i: unfused(x, r, g, ws[i % nc]),
                                   lambda i: torch.ops.coconut.add_rms_norm_linear(x, r, g, [ws[i % nc]], [None],
                                                                                   EPS)],
                                  max(args.calls, nc), args.pairs, dev)
                rows.append(summarize(case, times, (n * k + 3 * m * k + m * n) * elem, bw))
            except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
                rows.append({**case, "error": f"{type(e).__name__}: {e}"[:500]})
            print(rows[-1], flush=True)
        del ws
    return rows


def gemv_part(args: argparse.Namespace, bw: float, t0: float) -> list[dict[str, Any]]:
    """The engine's small-M linear op against the Inductor-compiled ``linear(act(x), W)``, per site and M."""
    import nanovllm.layers.gemv_op  # noqa: F401 - registers torch.ops.nanovllm.linear_small_m

    dev, dt = args.device, args.dtype
    elem = torch.tensor([], dtype=dt).element_size()

    def unfused_fn(x: torch.Tensor, w: torch.Tensor, silu_mul: bool) -> torch.Tensor:
        if silu_mul:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return F.linear(x, w)

    unfused = torch.compile(unfused_fn, dynamic=True)
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(1)
    for site in [s for s in args.sites if s in GEMV_SITES]:
        n, k, act = GEMV_SITES[site]
        n, k = max(16, n // int(args.scale)), max(16, k // int(args.scale))
        nc = copies_for(n * k * elem, args.calls)
        ws = [(torch.randn(n, k, generator=gen) * 0.02).to(dev, dt) for _ in range(nc)]
        kx = 2 * k if act == "silu_mul" else k
        for m in [m for m in args.ms if m <= 64]:
            case: dict[str, Any] = {"site": site, "M": m, "N": n, "K": k, "act": act, "weight_copies": nc}
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({**case, "skipped": "budget"})
                continue
            try:
                x = torch.randn(m, kx, generator=gen).to(dev, dt)
                y = torch.ops.nanovllm.linear_small_m(x, ws[0], None, act)
                x64 = x.double()
                if act == "silu_mul":
                    x64 = F.silu(x64[:, :k]) * x64[:, k:]
                case["rel_err"] = round(rel_err(y, F.linear(x64, ws[0].double())), 6)
                if args.no_time:
                    rows.append(case)
                    print(case, flush=True)
                    continue
                silu = act == "silu_mul"
                times = paired_us([lambda i: unfused(x, ws[i % nc], silu),
                                   lambda i: torch.ops.nanovllm.linear_small_m(x, ws[i % nc], None, act)],
                                  max(args.calls, nc), args.pairs, dev)
                rows.append(summarize(case, times, (n * k + m * kx + m * n) * elem, bw))
            except Exception as e:  # noqa: BLE001
                rows.append({**case, "error": f"{type(e).__name__}: {e}"[:500]})
            print(rows[-1], flush=True)
        del ws
    return rows


def attention_part(args: argparse.Namespace, bw: float, t0: float) -> list[dict[str, Any]]:
    """Paged decode attention (Qwen3-0.6B heads: 16 q, 8 kv, head_dim 128, blocks of 16) against its K/V floor
    (timed alone: its PyTorch reference is a correctness check, not a fast path), checked against
    ``decode_attention_ref``."""
    from nanovllm.kernels import decode_attention, decode_attention_ref

    dev, dt = args.device, args.dtype
    elem = torch.tensor([], dtype=dt).element_size()
    h, hkv, d, bs = 16, 8, 128, 16
    scale = d ** -0.5
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(2)
    for b in args.batches:
        for ctx in args.contexts:
            case: dict[str, Any] = {"batch": b, "context": ctx}
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({**case, "skipped": "budget"})
                continue
            try:
                nblk = b * (-(-ctx // bs))
                kv_bytes = 2 * nblk * bs * hkv * d * elem
                nc = copies_for(kv_bytes, args.calls)
                caches = [(torch.randn(nblk, bs, hkv, d, generator=gen).to(dev, dt),
                           torch.randn(nblk, bs, hkv, d, generator=gen).to(dev, dt)) for _ in range(nc)]
                perm = torch.randperm(nblk, generator=gen).to(torch.int32)
                tables = perm.view(b, -1).to(dev)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
                q = torch.randn(b, h, d, generator=gen).to(dev, dt)
                o = decode_attention(q, caches[0][0], caches[0][1], tables, lens, scale, max_context_len=ctx)
                ref = decode_attention_ref(q, caches[0][0], caches[0][1], tables, lens, scale)
                case["rel_err"] = round(rel_err(o, ref), 6)
                case["kv_copies"] = nc
                if args.no_time:
                    rows.append(case)
                    print(case, flush=True)
                    del caches
                    continue
                op = (lambda i: decode_attention(q, *caches[i % nc], tables, lens, scale, max_context_len=ctx))
                times = paired_us([op, op], max(args.calls, nc), max(3, args.pairs // 2), dev)
                op_us = median(times[0] + times[1])
                floor_us = (kv_bytes + 2 * b * h * d * elem) / bw * 1e6
                case.update(op_us=round(op_us, 3), floor_us=round(floor_us, 3),
                            op_fraction_of_floor=round(floor_us / op_us, 4),
                            kv_tb_s=round(kv_bytes / (op_us * 1e-6) / 1e12, 3))
                rows.append(case)
                del caches
            except Exception as e:  # noqa: BLE001
                rows.append({**case, "error": f"{type(e).__name__}: {e}"[:500]})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts, write the JSON; returns 0, or 1 when a case failed or a rel_err is >= 1e-2."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    bw = floors.bandwidth_bytes_per_s()
    res: dict[str, Any] = {"device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
                           "bandwidth_bytes_per_s": bw, "method": __doc__.split("\n\n")[2]}
    runs = {"fusion": fusion_part, "gemv": gemv_part, "attention": attention_part}
    for part in args.what:
        res[part] = runs[part](args, bw, t0)
        results_io.write_json(args.out, res)
    rows = [r for p in args.what for r in res[p]]
    bad = [r for r in rows if "error" in r or (r.get("rel_err") is not None and r["rel_err"] >= 1e-2)]
    res["failed"] = len(bad)
    results_io.write_json(args.out, res)
    return 1 if bad else 0
