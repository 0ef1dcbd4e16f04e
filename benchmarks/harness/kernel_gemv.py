"""Benchmark the small-M Triton GEMV (nanovllm/kernels/gemv.py) against cuBLAS at Qwen3-0.6B's decode shapes (bf16).

Shapes (y[M, N] = act(x) @ W[N, K]^T):
  o_proj     N=1024, K=2048, act none       x [M, 2048]
  down_proj  N=1024, K=3072, act silu_mul   x [M, 6144] = [gate | up]
  qkv        N=4096, K=1024, act none       (for reference: cuBLAS already does well there)
and M in {1, 2, 3, 4, 6, 8, 12, 16}. Times in microseconds per call:
  cublas_us     F.linear(x, W)                                   (down_proj: on the precomputed activation)
  torch_act_us  down_proj only: F.silu(gate) * up + F.linear     (eager, no Inductor: the op's PyTorch path)
  gemv_us       the Triton GEMV with the launcher's rule          (what torch.ops.nanovllm.linear_small_m runs)
  configs_us    every (rows per program, num_warps) config of gemv.CONFIG_CHOICES and EXTRA_CONFIGS, forced
                (named "<rows>x<warps>w/bk<block_k>"; block_k < K means the K loop)
  baseline_us   cublas_us (o_proj, qkv) or torch_act_us (down_proj); speedup = baseline_us / gemv_us
  floor_us      bytes (W + x + y) / 4.3 TB/s
Timing: each callable runs `--reps` times per CUDA graph; weights are rotated over enough copies to exceed 2x the
60 MB L2 (one graph per `--reps` copies, the graphs replayed in turn, so every call reads its weight from HBM);
`--rounds` rounds over all graphs, one CUDA-event interval per round; median over the rounds.
Correctness: bf16 GEMV vs a float32 reference (rel err ||y - ref|| / ||ref|| < 1e-2), and the op at the GPU table's
gemv_max_m (nanovllm/kernels/gemv/dispatch.py).

Before timing, the Triton variants are compiled in parallel worker processes (`--precompile-workers`, default 8)
that fill Triton's on-disk cache, so the whole run takes well under a minute.

Usage (repository root, on the GPU):  python benchmarks/kernels.py --what gemv [--part-args 'gemv=--ms 1,2,4 --shapes o_proj']
Writes JSON {meta: GPU/torch/triton/date/command, rows, crossover} to ``--out``.
The table's gemv_max_m (the op's threshold) only affects the op check; the table shows every M.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import floors, parallel_compile, provenance, results_io, tables  # noqa: E402

SHAPES: dict[str, tuple[int, int, str]] = {  # name: (N, K, act)
    "o_proj": (1024, 2048, "none"),
    "down_proj": (1024, 3072, "silu_mul"),
    "qkv": (4096, 1024, "none"),
}
MS = (1, 2, 3, 4, 6, 8, 12, 16)
# Timed besides gemv.CONFIG_CHOICES (the rule's candidates): few-warp programs, which measured fastest at M >= 3
# for the fused norm GEMV (fusion_pass "multirow", K = 1024: no cross-warp reductions, no barriers between rows).
EXTRA_CONFIGS: tuple[tuple[int, int], ...] = ((4, 2), (2, 1))
L2_BYTES = 60 << 20
HBM_BPS = floors.bandwidth_bytes_per_s()
DTYPE = torch.bfloat16
DEVICE = "cuda"  # tests run the row logic on the CPU (interpreter) with DEVICE = "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=results_io.default_out("gemv"))
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values (<= 16; <= 32 with "
                   "--skinny)")
    p.add_argument("--skinny", action="store_true", help="also time every SKINNY_CHOICES config of the split-K "
                   "tensor-core kernel (gemv.gemv_skinny_triton), the only kernel for M > 16")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--reps", type=int, default=10, help="calls per CUDA graph")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds over all graphs (median)")
    p.add_argument("--no-configs", action="store_true", help="time only the rule's config, not every config")
    p.add_argument("--precompile-workers", type=int, default=8, help="processes that compile the kernels first "
                   "(0: compile in this process)")
    p.add_argument("--budget-s", type=float, default=50.0, help="stop starting new cases after this many seconds")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ cases
def gemv_configs(m: int, n: int, k: int, all_configs: bool, skinny: bool = False, act: str = "none") -> list[Any]:
    """The rule's config first: what ``torch.ops.nanovllm.linear_small_m`` runs for these rows (the GPU table's
    ``skinny_config`` above its gemv_max_m, else the GEMV's ``choose_config``); then every SKINNY_CHOICES config when
    skinny (or M > MAX_M, where only the skinny kernel applies), and the other CONFIG_CHOICES and EXTRA_CONFIGS
    (with their block_k) when all_configs and M <= MAX_M."""
    from nanovllm.kernels import gemv as G

    table = engine_table()
    rule = table.skinny_config(m, act) if m > min(table.gemv_max_m, G.MAX_M) else G.choose_config(m, n, k)
    out = [rule]
    if skinny or m > G.MAX_M:
        out += [c for c in G.SKINNY_CHOICES if c not in out]
    if all_configs and m <= G.MAX_M:
        for bn, warps in G.CONFIG_CHOICES + EXTRA_CONFIGS:
            cfg = G.GemvConfig(bn, G.block_k_for(bn, warps, k), warps)
            if cfg not in out:
                out.append(cfg)
    return out


def engine_table() -> Any:
    """The engine's table of the GPU at hand (nanovllm/kernels/gemv/dispatch.py), or the H200's where there is none
    (the CPU logic tests, a GPU not measured yet)."""
    from nanovllm.kernels import gemv as G

    table = G.table_for(torch.device(DEVICE)) if str(DEVICE).startswith("cuda") else None
    return table or G.TABLES["H200"]


def cfg_name(cfg: Any) -> str:
    from nanovllm.kernels import gemv as G

    if isinstance(cfg, G.SkinnyConfig):
        return f"skinny{cfg.block_n}x{cfg.num_warps}w/ks{cfg.chunk_k}" + ("+fixup" if cfg.fixup else "")
    return f"{cfg.block_n}x{cfg.num_warps}w/bk{cfg.block_k}"


def run_config(x: torch.Tensor, w: torch.Tensor, act: str, cfg: Any) -> torch.Tensor:
    """One launch of the kernel a config belongs to: the split-K skinny kernel (SkinnyConfig) or the GEMV."""
    from nanovllm.kernels import gemv as G

    if isinstance(cfg, G.SkinnyConfig):
        return G.gemv_skinny_triton(x, w, None, act, config=cfg)
    return G.gemv_triton(x, w, None, act, config=cfg)


def _precompile(job: tuple[str, int, tuple[str, tuple[int, int, int]]]) -> str:
    """Worker: run the kernel once with the exact argument kinds of the benchmark (so the launch specializes the
    same way and the parent finds the compiled kernel in Triton's on-disk cache)."""
    name, m, (kind, cfg_t) = job
    from nanovllm.kernels import gemv as G

    n, k, act = SHAPES[name]
    x = torch.randn(m, 2 * k if act == "silu_mul" else k, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE)
    run_config(x, w, act, G.SkinnyConfig(*cfg_t) if kind == "skinny" else G.GemvConfig(*cfg_t))
    torch.cuda.synchronize()
    return f"{name} M={m} {cfg_t}"


def precompile(jobs: list[tuple[str, int, tuple[str, tuple[int, int, int]]]], workers: int) -> float:
    """Compile every (shape, BLOCK_M, config) once, in `workers` spawned processes. Returns seconds spent."""
    t0 = time.time()
    seen, uniq = set(), []
    for name, m, cfg_t in jobs:  # one job per kernel specialization: BLOCK_M = next_pow2(M), and Triton's own
        key = (name, 1 if m == 1 else 1 << (m - 1).bit_length(), m == 1, m % 16 == 0, cfg_t)  # of M == 1, M % 16
        if key not in seen:
            seen.add(key)
            uniq.append((name, m, cfg_t))
    parallel_compile.run_in_spawned_workers(_precompile, uniq, workers)
    return time.time() - t0


# ------------------------------------------------------------------------------------------------ timing
def graph_time_us(fn: Callable[[int], Any], copies: int, reps: int, rounds: int) -> float:
    """Median microseconds per call of fn(i), i = 0..copies-1 (call i reads weight copy i).

    One CUDA graph per `reps` consecutive copies; a round replays every graph once (so between two replays of one
    graph all other copies were read: > 2x L2 in total); one event interval per round, all rounds enqueued back
    to back (the GPU never waits for the CPU after the first), median over rounds.
    """
    for i in range(2):
        fn(i)
    torch.cuda.synchronize()
    graphs = []
    for g in range(copies // reps):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(reps):
                fn(g * reps + j)
        graphs.append(graph)
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(rounds + 1)]
    events[0].record()
    for r in range(rounds):
        for graph in graphs:
            graph.replay()
        events[r + 1].record()
    torch.cuda.synchronize()
    per_round = sorted(events[r].elapsed_time(events[r + 1]) for r in range(rounds))
    del graphs
    return per_round[len(per_round) // 2] * 1e3 / copies


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y.double() - ref.double()).norm() / ref.double().norm()).item())


def bench_shape(name: str, ms: list[int], args: argparse.Namespace, t0: float) -> list[dict[str, Any]]:
    from nanovllm.kernels import gemv as G

    n, k, act = SHAPES[name]
    kx = 2 * k if act == "silu_mul" else k
    w_bytes = n * k * 2
    copies = math.ceil(math.ceil(2 * L2_BYTES / w_bytes) / args.reps) * args.reps
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ws = [torch.randn(n, k, device=DEVICE, dtype=DTYPE, generator=gen) * k ** -0.5 for _ in range(copies)]
    rows = []
    for m in ms:
        row: dict[str, Any] = {"shape": name, "M": m, "N": n, "K": k, "act": act, "dtype": "bfloat16",
                               "weight_copies": copies,
                               "floor_us": round((w_bytes + (m * kx + m * n) * 2) / HBM_BPS * 1e6, 3)}
        if time.time() - t0 > args.budget_s:
            row["error"] = "skipped: time budget"
            rows.append(row)
            continue
        try:
            x = torch.randn(m, kx, device=DEVICE, dtype=DTYPE, generator=gen)
            a = G.apply_act(x, act)  # bf16 activation, as the eager model computes it
            row["cublas_us"] = round(graph_time_us(lambda i: F.linear(a, ws[i]), copies, args.reps, args.rounds), 3)
            if act == "silu_mul":
                row["torch_act_us"] = round(graph_time_us(lambda i: F.linear(G.apply_act(x, act), ws[i]), copies,
                                                          args.reps, args.rounds), 3)
            row["baseline_us"] = row.get("torch_act_us", row["cublas_us"])
            cfgs = gemv_configs(m, n, k, not args.no_configs, args.skinny, act)
            row["rule_config"] = cfg_name(cfgs[0])
            row["configs_us"] = {}
            for cfg in cfgs:
                us = graph_time_us(lambda i, c=cfg: run_config(x, ws[i], act, c), copies, args.reps, args.rounds)
                row["configs_us"][cfg_name(cfg)] = round(us, 3)
            row["gemv_us"] = row["configs_us"][row["rule_config"]]
            row["best_config"] = min(row["configs_us"], key=row["configs_us"].get)
            row["best_us"] = row["configs_us"][row["best_config"]]
            row["speedup"] = round(row["baseline_us"] / row["gemv_us"], 3)
            row["speedup_vs_cublas_alone"] = round(row["cublas_us"] / row["gemv_us"], 3)
            row["gemv_bw_tb_s"] = round((w_bytes + (m * kx + m * n) * 2) / (row["gemv_us"] * 1e-6) / 1e12, 2)
            ref = G.gemv_ref(x.float(), ws[0].float(), None, act)
            row["rel_err"] = rel_err(run_config(x, ws[0], act, cfgs[0]), ref)
            row["best_rel_err"] = rel_err(run_config(x, ws[0], act, next(c for c in cfgs
                                                                          if cfg_name(c) == row["best_config"])), ref)
            row["rel_err_torch_path"] = rel_err(F.linear(G.apply_act(x, act), ws[0]), ref)
            row["ok"] = row["rel_err"] < 1e-2 and row["best_rel_err"] < 1e-2
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=4)
        rows.append(row)
        print(f"  {name:9} M={m:2}  cublas {row.get('cublas_us', '-')}  baseline {row.get('baseline_us', '-')}  "
              f"gemv {row.get('gemv_us', '-')} ({row.get('rule_config', '-')})  best {row.get('best_us', '-')} "
              f"({row.get('best_config', '-')})  err {row.get('rel_err', row.get('error', '-'))}", flush=True)
    del ws
    torch.cuda.empty_cache()
    return rows


def op_check() -> dict[str, Any]:
    """torch.ops.nanovllm.linear_small_m at M = gemv_max_m (the GEMV) and gemv_max_m + 1 (the skinny kernel) of the
    GPU's table vs float32."""
    from nanovllm.kernels import gemv as G
    from nanovllm.layers import gemv_op  # noqa: F401 - registers the op

    max_m = engine_table().gemv_max_m
    out: dict[str, Any] = {"gemv_max_m": max_m}
    n, k, act = SHAPES["down_proj"]
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5
    for m in {max(1, max_m), max_m + 1}:
        x = torch.randn(m, 2 * k, device=DEVICE, dtype=DTYPE)
        y = torch.ops.nanovllm.linear_small_m(x, w, None, act)
        path = G.choose_path(x, w, None, act)[0]
        out[f"M={m}"] = {"path": path,
                         "rel_err": rel_err(y, G.gemv_ref(x.float(), w.float(), None, act))}
    out["ok"] = all(v["rel_err"] < 1e-2 for kk, v in out.items() if kk.startswith("M="))
    return out


def crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape, the largest M such that the rule's GEMV beats the baseline at every measured M up to it."""
    res: dict[str, Any] = {}
    for name in SHAPES:
        ok = sorted((r["M"], r["speedup"]) for r in rows if r["shape"] == name and "speedup" in r)
        best = 0
        for m, s in ok:
            if s <= 1.0:
                break
            best = m
        if ok:
            res[name] = best
    models = [res[s] for s in ("o_proj", "down_proj") if s in res]
    res["suggested_gemv_max_m"] = min(models) if models else None
    return res


def print_rows(rows: list[dict[str, Any]]) -> None:
    headers = ["shape", "M", "floor", "cublas", "torch act+lin", "gemv (rule)", "rule cfg", "best cfg", "best",
               "speedup", "TB/s", "rel err"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["shape"], r["M"], r["floor_us"], "ERROR", r["error"][:60]] + [None] * 7)
            continue
        table.append([r["shape"], r["M"], r["floor_us"], r["cublas_us"], r.get("torch_act_us"), r["gemv_us"],
                      r["rule_config"], r["best_config"], r["best_us"], r["speedup"], r["gemv_bw_tb_s"],
                      f"{r['rel_err']:.1e}"])
    tables.print_table(headers, table, title="Small-M GEMV vs cuBLAS, bf16, us per call in CUDA graphs "
                                             "(weights from HBM); speedup = baseline / gemv (rule)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("the gemv benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    ms = [int(v) for v in args.ms.split(",") if v]
    names = [s for s in args.shapes.split(",") if s]
    for s in names:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    from nanovllm.kernels import gemv as G

    jobs = [(name, m, ("skinny" if isinstance(c, G.SkinnyConfig) else "gemv", tuple(c))) for name in names for m in ms
            for c in gemv_configs(m, SHAPES[name][0], SHAPES[name][1], not args.no_configs, args.skinny,
                                  SHAPES[name][2])]
    compile_s = precompile(jobs, args.precompile_workers)
    print(f"precompiled {len(jobs)} (shape, M, config) cases in {compile_s:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += bench_shape(name, ms, args, t0)
    op = op_check()
    cross = crossover(rows)
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    meta.update({"reps_per_graph": args.reps, "rounds": args.rounds, "l2_bytes_assumed": L2_BYTES,
                 "hbm_bytes_per_s": HBM_BPS, "precompile_s": round(compile_s, 1),
                 "wall_s": round(time.time() - t0, 1)})
    ok = [r for r in rows if "speedup" in r]
    result = {"meta": meta, "rows": rows, "crossover": cross, "op_check": op,
              "all_correct": all(r.get("ok", False) for r in ok) and op["ok"],
              "errors": sum("error" in r for r in rows)}
    path = results_io.write_json(args.out, result)
    print_rows(rows)
    print(f"\ncrossover (largest M where the GEMV wins at every M up to it): {cross}")
    print(f"op check: {op}")
    print(f"all correct: {result['all_correct']}  errors: {result['errors']}  wall {meta['wall_s']} s  -> {path}")
    return 0 if result["all_correct"] and not result["errors"] else 1

