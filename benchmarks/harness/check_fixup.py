"""GPU stress check of the skinny kernels' in-kernel split-K fixup (last-arrival tile counters), bf16.

The fixup is correct only if every program's partial is visible to the last program of its n-tile and every
counter is back to zero after each launch, including when launches overlap through PDL inside a CUDA graph. For
each site (the fused norm -> linear op at qkv / gate_up, the engine's skinny GEMV at o_proj / down_proj with SwiGLU)
and M in MS, this script
  1. computes y with the split-K epilogue / reduction kernel (fixup off) and a float64 reference;
  2. captures one CUDA graph of CALLS back-to-back fixup launches (each its own weight copy and output buffer),
     replays it REPLAYS times and compares every output to (1) after every replay;
  3. checks that the counter buffer is all zeros at the end.
Pass: no NaN; ||y - ref64|| / ||ref64|| <= --tol (1e-2) for every output; counters zero. It also reports how many
outputs equal the fixup-off result bit for bit (expected: all; the sums are taken in the same order).

Usage: python benchmarks/check.py --what fixup [--replays 30]
Prints a table, writes JSON, exits 1 on a failure (2 without CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Optional


import torch  # noqa: E402

from . import provenance, results_io, tables
import torch.nn.functional as F  # noqa: E402

MS = [2, 3, 4, 8, 13, 16, 17, 32]
# name: (N, K, kind); kind "fused" = fusion_pass.kernels.fused_linear (norm prologue, residual), "gemv_none" /
# "gemv_silu_mul" = nanovllm.kernels.gemv.gemv_skinny_triton with that activation.
SITES = {"qkv": (4096, 1024, "fused"), "gate_up": (6144, 1024, "fused"), "o_proj": (1024, 2048, "gemv_none"),
         "down_proj": (1024, 3072, "gemv_silu_mul")}
EPS = 1e-6


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=results_io.default_out("fixup-check"))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--calls", type=int, default=12, help="fixup launches per CUDA graph")
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--tol", type=float, default=1e-2)
    return p.parse_args(argv)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def site_fns(name: str, m: int, copies: int, gen: torch.Generator) -> tuple[Callable[[int, bool], torch.Tensor],
                                                                             Callable[[int], torch.Tensor], str]:
    """(run(i, fixup) -> y for weight copy i, reference(i) -> float64 y, config name) for one site and M."""
    from fusion_pass import kernels
    from nanovllm.kernels import gemv as G

    n, k, kind = SITES[name]
    dev, dt = "cuda", torch.bfloat16
    ws = [torch.randn(n, k, device=dev, dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    if kind == "fused":
        x = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
        r = torch.randn(m, k, device=dev, dtype=dt, generator=gen)
        g = (1 + 0.2 * torch.randn(k, device=dev, generator=gen)).to(dt)
        cfg = kernels.SKINNY_CONFIGS[kernels.m_bucket(m)][0][:3]

        def run(i: int, fixup: bool) -> torch.Tensor:
            return kernels.fused_linear(x, g, ws[i], None, EPS, residual2d=r, variant="skinny",
                                        config=tuple(cfg) + (int(fixup),))

        def ref(i: int) -> torch.Tensor:
            h = (x + r).double()
            a = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g.double()
            return F.linear(a, ws[i].double())
        return run, ref, f"fused skinny {list(cfg)}"
    act = kind[len("gemv_"):]
    x = torch.randn(m, 2 * k if act == "silu_mul" else k, device=dev, dtype=dt, generator=gen)
    cfg = G.TABLES["H200"].skinny_config(m, act)  # the launch shape the H100 / H200 table picks

    def run(i: int, fixup: bool) -> torch.Tensor:
        return G.gemv_skinny_triton(x, ws[i], None, act, config=cfg._replace(fixup=fixup))

    def ref(i: int) -> torch.Tensor:
        return F.linear(G.apply_act(x.double(), act), ws[i].double())
    return run, ref, f"gemv skinny {tuple(cfg[:3])}"


def check_one(name: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    from fusion_pass import kernels

    gen = torch.Generator(device="cuda").manual_seed(m * 1009 + len(name))
    run, ref, cfg = site_fns(name, m, args.calls, gen)
    expect = [run(i, False) for i in range(args.calls)]
    refs = [ref(i) for i in range(args.calls)]
    eager = [run(i, True) for i in range(args.calls)]  # eager fixup launches (also allocate the counters)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            outs = [run(i, True) for i in range(args.calls)]
    torch.cuda.current_stream().wait_stream(stream)
    worst, nan, bitwise, total = 0.0, 0, 0, 0
    for y in eager:
        nan += int(torch.isnan(y).any())
    for i, y in enumerate(eager):
        worst = max(worst, rel_err(y, refs[i]))
        bitwise += int(torch.equal(y, expect[i]))
        total += 1
    for _ in range(args.replays):
        for y in outs:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, y in enumerate(outs):
            nan += int(torch.isnan(y).any())
            worst = max(worst, rel_err(y, refs[i]))
            bitwise += int(torch.equal(y, expect[i]))
            total += 1
    counters = kernels.skinny._FIXUP_BUFFERS.get(str(torch.device("cuda", torch.cuda.current_device())))
    zero = counters is not None and int(counters.count_nonzero()) == 0
    ref_err = max(rel_err(e, r) for e, r in zip(expect, refs))
    del graph
    ok = nan == 0 and worst <= args.tol and zero
    return {"site": name, "M": m, "config": cfg, "outputs": total, "nan_outputs": nan, "bitwise_equal": bitwise,
            "worst_rel_err": worst, "fixup_off_rel_err": ref_err, "counters_zero": zero, "ok": ok}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("the fixup check needs a CUDA GPU", file=sys.stderr)
        return 2

    t0 = time.time()
    rows = []
    for name in [s for s in args.sites.split(",") if s]:
        if name not in SITES:
            raise SystemExit(f"unknown site {name!r}; choose from {', '.join(SITES)}")
        for m in [int(v) for v in args.ms.split(",") if v]:
            try:
                rows.append(check_one(name, m, args))
            except Exception as e:  # report and go on: one broken case must not hide the others
                rows.append({"site": name, "M": m, "error": f"{type(e).__name__}: {e}", "ok": False})
    tables.print_table(["site", "M", "config", "outputs", "NaN", "bitwise", "worst err", "ok"],
                       [[r["site"], r["M"], r.get("config", r.get("error", "")), r.get("outputs", ""),
                         r.get("nan_outputs", ""), r.get("bitwise_equal", ""), r.get("worst_rel_err", ""), r["ok"]]
                        for r in rows], title="skinny split-K fixup under CUDA graphs (bf16)")
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    meta["wall_s"] = round(time.time() - t0, 1)
    ok = all(r["ok"] for r in rows)
    path = results_io.write_json(args.out, {"meta": meta, "calls_per_graph": args.calls, "replays": args.replays,
                                            "tol": args.tol, "all_ok": ok, "rows": rows})
    print(f"{'OK' if ok else 'FAILED'}: {sum(r['ok'] for r in rows)}/{len(rows)} cases; wrote {path}")
    return 0 if ok else 1

