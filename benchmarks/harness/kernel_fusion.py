"""Benchmark the coconut fused (add +) RMSNorm -> linear op against Inductor norm + cuBLAS linear (H200, bf16).

For every Qwen3-0.6B site (qkv 4096x1024, gate_up 6144x1024, lm_head 151936x1024) and M in
[1, 2, 4, ..., 8192] (lm_head capped by --lm-head-max-m, default 1024), times, in microseconds per call:
  cublas_us   : F.linear alone (cuBLAS)
  unfused_us  : Inductor-compiled (x + r -> RMSNorm) followed by F.linear   (the baseline)
  op_us       : torch.ops.coconut.add_rms_norm_linear with the measured dispatch (what the engine runs)
  variants_us : every raw candidate of the dispatcher, forced (unfused = Triton norm + cuBLAS, stream[..], skinny[..])
Timing: each callable runs --reps times inside one CUDA graph, weights rotated over enough copies to exceed
2x the 60 MB L2 (so they stream from HBM as in a real model), replayed --iters times, median.
floor_us = bytes moved (W + x + r + h + y) / 4.3 TB/s. speedup = unfused_us / op_us; speedup_paired = the same ratio
taken per pair of interleaved graph replays (median, min, max over --pairs pairs), which cancels clock drift
between the two separate timings.

Writes ``--out`` (rows + min_speedup_m_le_16 + min_speedup_all_m + environment)
and prints a table. Usage: python benchmarks/kernels.py --what fusion [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable


import torch  # noqa: E402

from . import floors, parallel_compile, results_io
import torch.nn.functional as F  # noqa: E402

SITES = [("qkv", 4096, 1024), ("gate_up", 6144, 1024), ("lm_head", 151936, 1024)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
HBM_BPS = floors.bandwidth_bytes_per_s()  # measured copy bandwidth of this GPU (bytes/s)
EPS = 1e-6
# Launch shapes (BN, KS, num_warps, fixup) swept for the skinny variant with --skinny-grid: BN = 32-128 W rows per
# program (the MMA's M side), K in chunks of 128-512, 4-8 warps; the chunks summed by the split-K epilogue kernel
# (fixup 0) or inside the kernel by the last program of each n-tile (fixup 1). On the H200, BN = 16-32 (no fixup)
# measured 25-60 % slower than BN = 64.
SKINNY_SWEEP = [(64, 256, 4, 0), (64, 512, 8, 0), (64, 128, 4, 0), (128, 256, 8, 0), (32, 256, 4, 1), (64, 256, 4, 1),
                (64, 512, 8, 1), (64, 128, 4, 1), (128, 256, 8, 1), (128, 128, 4, 1), (128, 512, 8, 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=results_io.default_out("fusion-kernel"))
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    p.add_argument("--sites", default="qkv,gate_up,lm_head")
    p.add_argument("--lm-head-max-m", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10, help="calls per CUDA graph")
    p.add_argument("--iters", type=int, default=15, help="graph replays (median)")
    p.add_argument("--quick", action="store_true", help="M in {1, 16, 256}, qkv and lm_head only")
    p.add_argument("--budget-s", type=float, default=220.0, help="stop starting new cases after this many seconds")
    p.add_argument("--variants", default="", help="comma-separated fused variants the dispatcher may measure "
                   "(default: all of them; the unfused path is always measured)")
    p.add_argument("--precompile-workers", type=int, default=12, help="processes that compile every fused "
                   "candidate first, in parallel, into Triton's on-disk cache (0: compile while timing)")
    p.add_argument("--pairs", type=int, default=21, help="interleaved (unfused, op) graph replays per case for the "
                   "paired speedup (0: skip)")
    p.add_argument("--skinny-grid", action="store_true",
                   help="measure the skinny variant over SKINNY_SWEEP (every launch shape below) instead of its "
                   "registered configs")
    return p.parse_args(argv)


def graph_time_us(fn: Callable[[int], Any], reps: int, iters: int) -> float:
    """Median microseconds per call of fn(i), i = 0..reps-1, captured in one CUDA graph and replayed `iters` times.

    The dispatcher's timer (fusion_pass.kernels.time_in_graph) with this benchmark's warm-up: 3 eager calls
    before the capture, 2 untimed replays.
    """
    from fusion_pass import kernels

    return kernels.time_in_graph(fn, reps, iters, warmup_calls=3, warmup_replays=2)


def pair_order(p: int) -> tuple[int, int]:
    """Which graph replays first in pair p: (0, 1) for even p, (1, 0) for odd p (drift lands on both alike)."""
    return (0, 1) if p % 2 == 0 else (1, 0)


def pair_stats(ratios: list[float]) -> dict[str, float]:
    """Median, min and max of the per-pair ratios (rounded to 4 digits). Raises ValueError when empty."""
    if not ratios:
        raise ValueError("pair_stats: no pairs")
    return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
            "max": round(max(ratios), 4), "pairs": len(ratios)}


def paired_speedup(fn_ref: Callable[[int], Any], fn_new: Callable[[int], Any], reps: int,
                   pairs: int) -> dict[str, float]:
    """time(fn_ref) / time(fn_new) measured in interleaved pairs: each fn is captured in its own CUDA graph of
    `reps` calls (after 3 eager calls and one untimed replay); then `pairs` pairs of replays, the order alternating
    (see `pair_order`), each replay timed with CUDA events; the ratio is taken per pair, so slow drift of clocks
    between the two measurements cancels (the method of benchmarks/latency.py). Needs CUDA."""
    from fusion_pass import kernels

    graphs = [kernels.capture_graph(fn, reps, warmup_calls=3, warmup_replays=1) for fn in (fn_ref, fn_new)]
    ratios = []
    for p in range(pairs):
        t = [0.0, 0.0]
        for j in pair_order(p):
            t[j] = kernels.replay_ms(graphs[j])
        ratios.append(t[0] / t[1])
    del graphs
    return pair_stats(ratios)


def _precompile(job: tuple[int, int, str, tuple[int, ...]]) -> str:
    """Worker: one launch of a fused candidate with the benchmark's argument kinds (bf16, residual and h output;
    M itself, since Triton specializes M == 1 and M % 16 == 0), so the timing process finds it in the cache."""
    m, k, variant, cfg = job
    from fusion_pass import kernels

    dt = torch.bfloat16
    x, r = torch.randn(m, k, device="cuda", dtype=dt), torch.randn(m, k, device="cuda", dtype=dt)
    g, w = torch.ones(k, device="cuda", dtype=dt), torch.randn(4096, k, device="cuda", dtype=dt)
    kernels.fused_linear(x, g, w, None, EPS, residual2d=r, h_out=torch.empty_like(x), variant=variant, config=cfg)
    torch.cuda.synchronize()
    return f"M={m} {variant}{list(cfg)}"


def norm_ref(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Llama/Qwen residual form: h = x + r; a = (h_f32 * rsqrt(mean(h^2) + eps)).to(dtype) * g."""
    h = x + r
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    return hf.to(h.dtype) * g, h


def bench_case(name: str, n: int, k: int, m: int, ws: list[torch.Tensor], g: torch.Tensor, norm_c: Callable,
               args: argparse.Namespace) -> dict[str, Any]:
    from fusion_pass import kernels

    dt = torch.bfloat16
    copies = len(ws)
    x = torch.randn(m, k, device="cuda", dtype=dt)
    r = torch.randn(m, k, device="cuda", dtype=dt)
    row: dict[str, Any] = {"site": name, "M": m, "N": n, "K": k, "dtype": "bfloat16"}
    row["floor_us"] = round((n * k + 3 * m * k + m * n + k) * 2 / HBM_BPS * 1e6, 3)
    # the dispatcher's own measurement (also times every raw variant, forced, without the residual)
    choice = kernels.measure(m, n, k, dt, "cuda", reps=args.reps)
    kernels.dispatch._CACHE[kernels.dispatch._key(m, n, k, dt, "cuda")] = choice
    row["variants_us"] = dict(choice.times_us)
    row["chosen"] = choice.variant + (str(list(choice.config)).replace(" ", "") if choice.config else "")
    fused_times = {kk: v for kk, v in choice.times_us if not kk.startswith("unfused")}
    row["best_fused_variant"] = min(fused_times, key=fused_times.get) if fused_times else None
    row["best_fused_us"] = min(fused_times.values()) if fused_times else None
    row["cublas_us"] = round(graph_time_us(lambda i: F.linear(x, ws[i % copies]), args.reps, args.iters), 3)
    row["unfused_us"] = round(graph_time_us(lambda i: F.linear(norm_c(x, r, g)[0], ws[i % copies]),
                                            args.reps, args.iters), 3)
    op = torch.ops.coconut.add_rms_norm_linear
    row["op_us"] = round(graph_time_us(lambda i: op(x, r, g, [ws[i % copies]], [None], EPS), args.reps,
                                       args.iters), 3)
    row["speedup"] = round(row["unfused_us"] / row["op_us"], 3)
    if args.pairs > 0:
        row["speedup_paired"] = paired_speedup(lambda i: F.linear(norm_c(x, r, g)[0], ws[i % copies]),
                                               lambda i: op(x, r, g, [ws[i % copies]], [None], EPS),
                                               args.reps, args.pairs)
    if row["best_fused_us"]:
        row["speedup_best_fused_raw"] = round(row["unfused_us"] / row["best_fused_us"], 3)
    # correctness of what was timed
    y, h = op(x, r, g, [ws[0]], [None], EPS)
    a, href = norm_ref(x, r, g)
    ref = F.linear(a.double(), ws[0].double())
    row["rel_err"] = float(((y.double() - ref).norm() / ref.norm()).item())
    row["h_exact"] = bool(torch.equal(h, href))
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("the fusion kernel benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import fusion_pass  # noqa: F401
    from fusion_pass import kernels

    t0 = time.time()
    ms = [1, 16, 256] if args.quick else [int(v) for v in args.ms.split(",") if v]
    sites = [s for s in SITES if s[0] in args.sites.split(",")]
    if args.quick:
        sites = [s for s in sites if s[0] in ("qkv", "lm_head")]
    if args.skinny_grid:
        for b in kernels.SKINNY_CONFIGS:
            kernels.SKINNY_CONFIGS[b] = list(SKINNY_SWEEP)
    if args.variants:
        keep = {"unfused"} | set(args.variants.split(","))
        all_candidates = kernels.dispatch.candidates
        kernels.dispatch.candidates = lambda m: [c for c in all_candidates(m) if c[0] in keep]  # this run only
    if args.precompile_workers > 0:

        ks = sorted({k for _, _, k in sites})
        jobs = [(m, k, v, tuple(c)) for m in ms for k in ks for v, c in kernels.dispatch.candidates(kernels.m_bucket(m))
                if v != "unfused"]
        secs = parallel_compile.run_in_spawned_workers(_precompile, jobs, args.precompile_workers)
        print(f"precompiled {len(jobs)} fused candidates in {secs:.1f} s", flush=True)
    norm_c = torch.compile(norm_ref, dynamic=True)
    rows: list[dict[str, Any]] = []
    for name, n, k in sites:
        dt = torch.bfloat16
        gen = torch.Generator(device="cuda").manual_seed(0)
        copies = max(1, min(16, math.ceil((120 << 20) / (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
        g = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dt)
        for m in ms:
            if name == "lm_head" and m > args.lm_head_max_m:
                continue
            if time.time() - t0 > args.budget_s:
                rows.append({"site": name, "M": m, "N": n, "K": k, "error": "skipped: time budget"})
                continue
            try:
                row = bench_case(name, n, k, m, ws, g, norm_c, args)
            except Exception as e:
                row = {"site": name, "M": m, "N": n, "K": k, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=3)}
            rows.append(row)
            print(json.dumps({kk: v for kk, v in row.items() if kk not in ("variants_us", "traceback")}),
                  flush=True)
        del ws
        torch.cuda.empty_cache()
    ok = [r for r in rows if "speedup" in r]
    small = [r["speedup"] for r in ok if r["M"] <= 16]
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "reps_per_graph": args.reps, "replays": args.iters, "hbm_bytes_per_s": HBM_BPS,
        "min_speedup_m_le_16": min(small) if small else None,
        "min_speedup_all_m": min(r["speedup"] for r in ok) if ok else None,
        # the same from the interleaved pairs (median of unfused / op per pair)
        "min_speedup_m_le_16_paired": min((r["speedup_paired"]["median"] for r in ok
                                           if r["M"] <= 16 and "speedup_paired" in r), default=None),
        "min_speedup_all_m_paired": min((r["speedup_paired"]["median"] for r in ok if "speedup_paired" in r),
                                        default=None),
        "errors": sum("error" in r for r in rows),
        "dispatch_table": kernels.dispatch_table(),
        "wall_s": round(time.time() - t0, 1),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(rows)
    print(f"min speedup (M<=16): {result['min_speedup_m_le_16']}  min speedup (all M): "
          f"{result['min_speedup_all_m']}  paired: {result['min_speedup_m_le_16_paired']} / "
          f"{result['min_speedup_all_m_paired']}  errors: {result['errors']}  wall {result['wall_s']} s  -> {args.out}")
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = f"{'site':8} {'M':>5} {'floor':>8} {'cublas':>8} {'unfused':>8} {'op':>8} {'speedup':>7} {'paired':>7} " \
          f"{'best raw fused':>22} {'chosen':>20} {'rel_err':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['site']:8} {r['M']:>5} ERROR {r['error'][:90]}")
            continue
        bf = f"{r['best_fused_variant']}={r['best_fused_us']}" if r.get("best_fused_variant") else "-"
        paired = f"{r['speedup_paired']['median']:>7.3f}" if "speedup_paired" in r else f"{'-':>7}"
        print(f"{r['site']:8} {r['M']:>5} {r['floor_us']:>8.2f} {r['cublas_us']:>8.2f} {r['unfused_us']:>8.2f} "
              f"{r['op_us']:>8.2f} {r['speedup']:>7.3f} {paired} {bf:>22} {r['chosen']:>20} {r['rel_err']:>8.1e}")

