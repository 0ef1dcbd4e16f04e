"""Sweep of decode-shaped (M <= 4) linear kernels on the GPU: which launch shape streams a weight fastest?

It times the whole-row GEMV design over a grid of launch shapes for each linear site of a Qwen3-0.6B decode step,
beside the kernels the engine ran before, so the kernels could be chosen from data. Each program owns BN whole rows
of W (one ``[BN, next_power_of_2(K)]`` load, 16-byte vectors along K) and computes ``y = act(x) @ W^T`` where act is

    MODE 0 (plain):    x                                   (o_proj)
    MODE 1 (norm):     (x + r) * g, times 1/rms(x + r)       (qkv, gate_up, lm_head: FlashNorm epilogue,
                                                             Graef et al. 2024, arXiv 2407.09577)
    MODE 2 (silu_mul): silu(gate) * up, x = [gate | up]    (down_proj)

The grid is one program per tile (``grid=tiles``) or persistent (``grid=<c>xSM``: c programs per SM, each looping
over tiles with the next tile's W requested before the current one is reduced). The launch shapes swept: BN in
1..16 rows per program, 1-8 warps, and the grid. The kernels are the library's: fusion_pass's "stream" variant for
MODE 1 (every grid, M <= 4) and nanovllm.kernels.gemv's M = 1 row kernel for MODE 0 / 2 (one program per tile). (The
committed H200 figures (results/h200/kernels.json, part gemv-sweep) were measured at commit cf43532,
which carried one kernel with all three modes and also tried persistent grids and M = 4 for MODE 0 / 2: the
persistent grids did not win there, and at M = 4 cuBLAS or the register-blocked kernel won.)

Timed like the gemv part (CUDA graphs, weights rotated over > 2x the L2, median of rounds), against:
  cublas      F.linear on the precomputed activation
  unfused     norm sites: Triton RMSNorm (+ residual) kernel then F.linear (the coconut op's unfused path)
  current     what the engine runs: the coconut op's dispatched path (norm sites) or
              nanovllm.kernels.gemv (plain / silu_mul sites)

Usage: python benchmarks/kernels.py --what gemv-sweep [--part-args 'gemv-sweep=--sites qkv,gate_up --ms 1,4']
Writes JSON (meta + rows) to ``--out`` and prints the best configs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from . import floors, parallel_compile, provenance, results_io  # noqa: E402

# name: (N, K, MODE, HAS_RES)
SITES: dict[str, tuple[int, int, int, bool]] = {
    "qkv": (4096, 1024, 1, True),
    "gate_up": (6144, 1024, 1, True),
    "o_proj": (1024, 2048, 0, False),
    "down_proj": (1024, 3072, 2, False),
    "lm_head": (151936, 1024, 1, False),
}
BNS = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8)
GRIDS = ("tiles", "1xSM", "2xSM", "4xSM", "8xSM")
MAX_ELEMS = 128  # W elements per thread of one slab
MIN_ELEMS = 8
L2_BYTES = 60 << 20
EPS = 1e-6


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def grid_size(grid: str, n: int, bn: int) -> int:
    tiles = triton.cdiv(n, bn)
    if grid == "tiles":
        return tiles
    return min(tiles, int(grid.split("x")[0]) * num_sms())


def stream(x: torch.Tensor, r: torch.Tensor | None, g: torch.Tensor | None, w: torch.Tensor, h: torch.Tensor | None,
           mode: int, bn: int, warps: int, grid: str) -> torch.Tensor:
    """One launch of the library kernel for this site and launch shape: fusion_pass's "stream" variant (norm sites,
    any grid) or nanovllm.kernels.gemv's M = 1 row kernel (plain / SwiGLU sites, one program per tile). Returns y."""
    from fusion_pass import kernels as FK
    from nanovllm.kernels import gemv as G

    m = x.shape[0]
    n, k = w.shape
    if mode == 1:
        per_sm = 0 if grid == "tiles" else int(grid.split("x")[0])
        return FK.fused_linear(x, g, w, None, EPS, residual2d=r, h_out=h, variant="stream",
                               config=(bn, warps, per_sm))
    if m != 1 or grid != "tiles":
        raise ValueError("the row kernel takes one row and one program per tile")
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    G.rows._gemv_row_kernel[(triton.cdiv(n, bn),)](x, w, w, y, n, K=k, ACT="silu_mul" if mode == 2 else "none",
                                              HAS_BIAS=False, BLOCK_N=bn, BKP=triton.next_power_of_2(k),
                                              num_warps=warps, num_stages=1)
    return y


def applicable(mode: int, m: int, grid: str) -> bool:
    """Launch shapes the library kernels offer: any grid for the norm sites; one row and one program per tile for
    the plain / SwiGLU sites."""
    return mode == 1 or (m == 1 and grid == "tiles")


def configs(k: int) -> list[tuple[int, int]]:
    kp = triton.next_power_of_2(k)
    return [(bn, wp) for bn in BNS for wp in WARPS if MIN_ELEMS <= bn * kp // (32 * wp) <= MAX_ELEMS]


def make_inputs(site: str, m: int, copies: int, gen: torch.Generator) -> dict[str, Any]:
    n, k, mode, has_res = SITES[site]
    dev, dt = "cuda", torch.bfloat16
    kx = 2 * k if mode == 2 else k
    return {
        "x": torch.randn(m, kx, device=dev, dtype=dt, generator=gen),
        "r": torch.randn(m, k, device=dev, dtype=dt, generator=gen) if has_res else None,
        "g": (1.0 + 0.1 * torch.randn(k, device=dev, dtype=dt, generator=gen)) if mode == 1 else None,
        "ws": [torch.randn(n, k, device=dev, dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)],
        "h": torch.empty(m, k, device=dev, dtype=dt) if has_res else None,
    }


def reference(site: str, inp: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 reference of y (and of h = x + r in the activation dtype)."""
    n, k, mode, has_res = SITES[site]
    x = inp["x"].float()
    w = inp["ws"][0].float()
    h = None
    if mode == 1:
        hb = (x + inp["r"].float()).to(torch.bfloat16) if has_res else inp["x"]
        h = hb if has_res else None
        hf = hb.float()
        a = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS) * inp["g"].float()
    elif mode == 2:
        gate, up = x.chunk(2, -1)
        a = F.silu(gate) * up
    else:
        a = x
    return a @ w.t(), h


def _precompile(job: tuple[str, int, int, int]) -> str:
    site, m, bn, warps = job
    gen = torch.Generator(device="cuda").manual_seed(0)
    inp = make_inputs(site, m, 1, gen)
    stream(inp["x"], inp["r"], inp["g"], inp["ws"][0], inp["h"], SITES[site][2], bn, warps, "tiles")
    torch.cuda.synchronize()
    return f"{site} {m} {bn} {warps}"




def baselines(site: str, m: int, inp: dict[str, Any], copies: int, time_fn: Callable[..., float]
              ) -> dict[str, float]:
    """cuBLAS alone, the unfused norm path (norm sites) and the kernel the engine runs today."""
    from fusion_pass import kernels as FK
    from nanovllm.kernels import gemv as G

    n, k, mode, has_res = SITES[site]
    x, r, g, ws, h = inp["x"], inp["r"], inp["g"], inp["ws"], inp["h"]
    out: dict[str, float] = {}
    if mode == 1:
        a, _ = FK.triton_rms_norm(x, g, EPS, residual2d=r)
    elif mode == 2:
        a = G.apply_act(x, "silu_mul")
    else:
        a = x
    out["cublas"] = time_fn(lambda i: F.linear(a, ws[i]))
    if mode == 1:
        out["unfused"] = time_fn(lambda i: F.linear(FK.triton_rms_norm(x, g, EPS, residual2d=r)[0], ws[i]))
        if site != "lm_head":
            out["current"] = time_fn(lambda i: FK.rms_norm_linear(x, g, [ws[i]], [None], EPS, residual2d=r)[0][0])
    else:
        act = "silu_mul" if mode == 2 else "none"
        out["current"] = time_fn(lambda i: G.gemv_triton(x, ws[i], None, act))
    return {kk: round(v, 3) for kk, v in out.items()}


def bench_site(site: str, ms: list[int], args: argparse.Namespace, t0: float) -> list[dict[str, Any]]:
    from .kernel_gemv import graph_time_us

    n, k, mode, has_res = SITES[site]
    w_bytes = n * k * 2
    reps = args.reps
    copies = max(reps, math.ceil(math.ceil(2 * L2_BYTES / w_bytes) / reps) * reps)
    if site == "lm_head":
        reps, copies = 1, 2  # 311 MB per copy: two copies exceed the L2 ten times over
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m in ms:
        if time.time() - t0 > args.budget_s:
            rows.append({"site": site, "M": m, "error": "skipped: time budget"})
            continue
        inp = make_inputs(site, m, copies, gen)

        def time_fn(fn: Callable[[int], Any]) -> float:
            return graph_time_us(fn, copies, reps, args.rounds)

        row: dict[str, Any] = {"site": site, "M": m, "N": n, "K": k, "mode": mode, "has_res": has_res,
                               "floor_us": round(w_bytes / floors.bandwidth_bytes_per_s() * 1e6, 3)}
        try:
            row["baselines_us"] = baselines(site, m, inp, copies, time_fn)
        except Exception as e:  # noqa: BLE001
            row["baseline_error"] = f"{type(e).__name__}: {e}"
        ref, href = reference(site, inp)
        times: dict[str, float] = {}
        errs: dict[str, float] = {}
        for bn, warps in configs(k):
            for grid in GRIDS:
                if grid != "tiles" and grid_size(grid, n, bn) >= triton.cdiv(n, bn):
                    continue  # the same launch as "tiles"
                if not applicable(mode, m, grid):
                    continue
                name = f"bn{bn}w{warps}/{grid}"
                try:
                    fn = (lambda i, bn=bn, warps=warps, grid=grid:
                          stream(inp["x"], inp["r"], inp["g"], inp["ws"][i], inp["h"], mode, bn, warps, grid))
                    times[name] = round(time_fn(fn), 3)
                    y = fn(0)
                    e = float(((y.float() - ref).norm() / ref.norm()).item())
                    if href is not None:
                        e = max(e, float((inp["h"].float() - href.float()).abs().max().item()))
                    errs[name] = e
                except Exception as ex:  # noqa: BLE001
                    times[name] = float("nan")
                    errs[name] = float("nan")
                    print(f"  {site} M={m} {name}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
        ok = {kk: v for kk, v in times.items() if v == v and errs[kk] < 1e-2}
        best = min(ok, key=ok.get) if ok else None
        row.update({"stream_us": times, "stream_rel_err": errs, "best": best,
                    "best_us": ok.get(best) if best else None,
                    "bad_configs": sorted(kk for kk in times if not (errs[kk] < 1e-2))})
        b = row.get("baselines_us", {})
        if best:
            for kk, v in b.items():
                row[f"speedup_vs_{kk}"] = round(v / ok[best], 3)
        print(f"{site:9} M={m}  floor {row['floor_us']}  baselines {b}  best {best} {row['best_us']}  "
              f"bad {len(row['bad_configs'])}", flush=True)
        top = sorted(ok.items(), key=lambda kv: kv[1])[:8]
        print("   top: " + ", ".join(f"{kk} {v}" for kk, v in top), flush=True)
        rows.append(row)
        del inp
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--ms", default="1,4")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--out", default=results_io.default_out("sweep-decode-linear"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the gemv-sweep benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    sites = [s for s in args.sites.split(",") if s]
    ms = [int(v) for v in args.ms.split(",") if v]
    jobs, seen = [], set()
    for s in sites:
        for m in ms:
            if s == "lm_head" and m > 1:
                continue
            for bn, wp in configs(SITES[s][1]):
                if not applicable(SITES[s][2], m, "tiles"):
                    continue
                key = (SITES[s][1:], triton.next_power_of_2(m), bn, wp)  # the kernel's specialization
                if key not in seen:
                    seen.add(key)
                    jobs.append((s, m, bn, wp))
    cs = parallel_compile.run_in_spawned_workers(_precompile, jobs, args.workers)
    print(f"precompiled {len(jobs)} kernels in {cs:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for s in sites:
        rows += bench_site(s, [m for m in ms if not (s == "lm_head" and m > 1)], args, t0)
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    meta.update({"num_sms": num_sms(), "precompile_s": round(cs, 1), "wall_s": round(time.time() - t0, 1),
                 "reps_per_graph": args.reps, "rounds": args.rounds})
    path = results_io.write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {path} in {meta['wall_s']} s")
    return 0

