"""GPU check and benchmark of the paged-attention Triton kernels (nanovllm/kernels).

Sections (each case runs in its own try/except; a failure is recorded as a row with ``error`` and the run goes on):

  correctness  bf16 Triton vs the PyTorch references (rel err ``||out-ref||/||ref|| <= 1e-2``) for prefill
               (full prompts, cached prefixes, chunked), decode (batch 1..256, contexts 1..4096, several split
               counts), store_kvcache, and decode captured in a CUDA graph and replayed with new context lengths;
               block sizes 16..256, block-aligned and not, block ids randomly permuted, NaN-poisoned outputs.
  decode       bandwidth of decode attention: bytes of K/V read / median time, vs 4.3 TB/s, Qwen3-0.6B shapes
               (16 q heads, 8 kv heads, head_dim 128, bf16), batch {1,8,32,128,256} x context {128..4096} x
               block size {16..256}; block table exactly as wide as needed ("tight") and padded to 4096 tokens
               ("padded", what a CUDA-graph batch with max_model_len=4096 sees).
  prefill      prefill throughput (TFLOP/s of causal attention, tokens/s) for a few shapes, plus torch SDPA on dense
               K/V for the same equal-length shapes as a baseline.

Timing: ``triton.testing.do_bench_cudagraph`` (median of CUDA-graph replays, no launch overhead), falling back to
``triton.testing.do_bench`` (median) if graph capture fails.

Usage (repository root, on the GPU):  python benchmarks/kernels.py --what attention [--quick]
Writes JSON {meta: GPU/torch/triton/date/command, rows: [...]} to ``--out``.
Budget: about 2-3 minutes on an H200 (``--max-seconds`` stops starting new cases after that many seconds).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from typing import Any, Callable

import torch
import triton
import triton.testing

from nanovllm.kernels import (
    choose_num_splits,
    decode_attention_ref,
    decode_attention_triton,
    prefill_attention,
    prefill_attention_ref,
    store_kvcache,
    store_kvcache_ref,
)

from . import floors, provenance, results_io

PEAK_BW = floors.bandwidth_bytes_per_s()  # bytes/s, measured copy bandwidth of this GPU
PEAK_FLOPS = floors.PEAK_BF16_FLOP_PER_S  # dense bf16 FLOP/s
DEFAULT_OUT = results_io.default_out("attention")
DTYPE = torch.bfloat16
TOL = 1e-2
# Qwen3-0.6B attention shapes.
H, HKV, D = 16, 8, 128


# ----------------------------------------------------------------------------------------------- helpers
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_cache(
    ctx_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, gen: torch.Generator,
    width_tokens: int | None = None, fill: str = "randn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paged bf16 K/V caches on the GPU holding the given contexts, block ids randomly permuted.

    Returns ``(k_cache, v_cache, block_tables)``; ``block_tables`` int32 ``[B, W]`` padded with -1, where
    ``W = cdiv(max(width_tokens, max ctx), block_size)``.
    """
    blocks = [triton.cdiv(c, block_size) for c in ctx_lens]
    num_blocks = sum(blocks) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if fill == "randn":
        k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
        v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    else:  # timing only: values do not matter
        k_cache = torch.empty(shape, device="cuda", dtype=DTYPE).uniform_(-1, 1)
        v_cache = torch.empty(shape, device="cuda", dtype=DTYPE).uniform_(-1, 1)
    width = triton.cdiv(max(max(ctx_lens), width_tokens or 0), block_size)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    bt = torch.full((len(ctx_lens), width), -1, dtype=torch.int32, device="cuda")
    if len(set(blocks)) == 1:  # vectorized fill for equal lengths (big batches)
        n = blocks[0]
        bt[:, :n] = perm[: n * len(ctx_lens)].view(len(ctx_lens), n)
    else:
        used = 0
        for b, n in enumerate(blocks):
            bt[b, :n] = perm[used : used + n]
            used += n
    return k_cache, v_cache, bt


def cu(lens: list[int]) -> torch.Tensor:
    """int32 prefix sums ``[0, l0, l0+l1, ...]`` on the GPU."""
    t = torch.zeros(len(lens) + 1, dtype=torch.int32)
    t[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return t.cuda()


def bench_ms(fn: Callable[[], Any]) -> tuple[float, str]:
    """Median milliseconds of ``fn``: CUDA-graph replays if capturable, else plain launches."""
    fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median")), "cudagraph"
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")), "do_bench"


class Runner:
    """Collects rows, prints them, enforces the time budget."""

    def __init__(self, max_seconds: float) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.max_seconds = max_seconds
        self.skipped = 0

    def case(self, section: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        row: dict[str, Any] = {"section": section, **params}
        if time.time() - self.t0 > self.max_seconds:
            self.skipped += 1
            row["error"] = "skipped: time budget exhausted"
            self.rows.append(row)
            return
        t = time.time()
        try:
            row.update(fn())
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            row["traceback"] = traceback.format_exc(limit=4)[-1500:]
            torch.cuda.synchronize()
        row["case_s"] = round(time.time() - t, 3)
        self.rows.append(row)
        print(format_row(row), flush=True)
        torch.cuda.empty_cache()


def format_row(row: dict[str, Any]) -> str:
    skip = {"section", "traceback", "case_s"}
    parts = [f"[{row['section']:<11}]"]
    for k, v in row.items():
        if k in skip:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------- correctness
def check_prefill(q_lens: list[int], ctx_lens: list[int], block_size: int, heads: tuple[int, int], head_dim: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_heads, num_kv = heads
    k_cache, v_cache, bt = make_cache(ctx_lens, block_size, num_kv, head_dim, gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda", dtype=DTYPE, generator=gen)
    args = (q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, max(q_lens), max(ctx_lens), head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(*args, out=out)
    ref = prefill_attention_ref(*args)
    err = rel_err(out, ref)
    all_written = bool(torch.isfinite(out).all())
    return {"rel_err": err, "all_written": all_written, "ok": err <= TOL and all_written}


def check_decode(ctx_lens: list[int], block_size: int, heads: tuple[int, int], head_dim: int, seed: int, num_splits: int | None) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_heads, num_kv = heads
    k_cache, v_cache, bt = make_cache(ctx_lens, block_size, num_kv, head_dim, gen)
    q = torch.randn(len(ctx_lens), num_heads, head_dim, device="cuda", dtype=DTYPE, generator=gen)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    ref = decode_attention_ref(q, k_cache, v_cache, bt, lens, head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    decode_attention_triton(q, k_cache, v_cache, bt, lens, head_dim**-0.5, num_splits=num_splits, out=out)
    err = rel_err(out, ref)
    all_written = bool(torch.isfinite(out).all())
    return {"rel_err": err, "all_written": all_written, "ok": err <= TOL and all_written}


def check_decode_graph(block_size: int, seed: int) -> dict[str, Any]:
    """Capture decode in a CUDA graph at max context, replay with other lengths, compare with the reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch, max_ctx = 8, 4096
    k_cache, v_cache, bt = make_cache([max_ctx] * batch, block_size, HKV, D, gen)
    q = torch.randn(batch, H, D, device="cuda", dtype=DTYPE, generator=gen)
    lens = torch.full((batch,), max_ctx, dtype=torch.int32, device="cuda")
    worst = 0.0
    out = torch.empty_like(q)
    lens.fill_(max_ctx)
    decode_attention_triton(q, k_cache, v_cache, bt, lens, D**-0.5, out=out)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention_triton(q, k_cache, v_cache, bt, lens, D**-0.5, out=out)
    for trial in range(3):
        new_lens = torch.randint(1, max_ctx + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
        lens.copy_(new_lens)
        q.copy_(torch.randn(batch, H, D, device="cuda", dtype=DTYPE, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        worst = max(worst, rel_err(out, decode_attention_ref(q, k_cache, v_cache, bt, lens, D**-0.5)))
    return {"rel_err": worst, "ok": worst <= TOL}


def check_store(block_size: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks, n = 64, 700
    shape = (num_blocks, block_size, HKV, D)
    k1 = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v1 = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    k2, v2 = k1.clone(), v1.clone()
    qkv = torch.randn(n, H + 2 * HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    key, value = qkv[:, H : H + HKV], qkv[:, H + HKV :]
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:n].to(torch.int32)
    slots[::5] = -1
    store_kvcache(key, value, k1, v1, slots)
    store_kvcache_ref(key, value, k2, v2, slots)
    ok = bool(torch.equal(k1, k2) and torch.equal(v1, v2))
    return {"ok": ok}


def section_correctness(r: Runner, quick: bool) -> None:
    block_sizes = [16, 32, 64, 128, 256]
    seed = 0
    for bs in block_sizes:
        seed += 1
        cases = {
            "full_prompts": ([1, 17, 128, 1000, 4096], [1, 17, 128, 1000, 4096]),
            "cached_prefix": ([1, 100, 513, 4096], [4096, 2048, 1025, 4096]),
            "aligned": ([bs, 4 * bs], [2 * bs, 4 * bs]),
        }
        for name, (ql, cl) in cases.items():
            r.case("correctness", {"kernel": "prefill", "case": name, "block_size": bs, "H": H, "Hkv": HKV, "D": D},
                   lambda ql=ql, cl=cl, bs=bs, s=seed: check_prefill(ql, cl, bs, (H, HKV), D, s))
        for batch in [1, 8, 256]:
            g = torch.Generator().manual_seed(seed * 100 + batch)
            if batch == 1:
                lens = [4095 if bs % 2 == 0 and bs > 16 else 4096]
            else:
                lens = torch.randint(1, 4097, (batch,), generator=g).tolist()
                lens[0] = 1
            for ns in ([None] if quick or batch > 8 else [None, 1, 7]):
                r.case("correctness", {"kernel": "decode", "batch": batch, "max_ctx": max(lens), "num_splits": ns, "block_size": bs},
                       lambda lens=lens, bs=bs, s=seed, ns=ns: check_decode(lens, bs, (H, HKV), D, s, ns))
        r.case("correctness", {"kernel": "store_kvcache", "block_size": bs}, lambda bs=bs, s=seed: check_store(bs, s))
        r.case("correctness", {"kernel": "decode_cudagraph", "block_size": bs}, lambda bs=bs, s=seed: check_decode_graph(bs, s))
    # Many sequences with random cached prefixes; other head layouts.
    g = torch.Generator().manual_seed(123)
    ql = torch.randint(1, 257, (64,), generator=g).tolist()
    cl = [q + int(p) for q, p in zip(ql, torch.randint(0, 600, (64,), generator=g).tolist())]
    for bs in [16, 256]:
        r.case("correctness", {"kernel": "prefill", "case": "64_seqs_random_prefix", "block_size": bs},
               lambda bs=bs: check_prefill(ql, cl, bs, (H, HKV), D, 7))
    for heads, hd in [((32, 8), 128), ((14, 2), 64), ((8, 8), 64)]:
        r.case("correctness", {"kernel": "prefill", "case": "heads", "H": heads[0], "Hkv": heads[1], "D": hd, "block_size": 32},
               lambda heads=heads, hd=hd: check_prefill([300, 5], [300, 700], 32, heads, hd, 9))
        r.case("correctness", {"kernel": "decode", "case": "heads", "H": heads[0], "Hkv": heads[1], "D": hd, "block_size": 32},
               lambda heads=heads, hd=hd: check_decode([3000, 5, 77], 32, heads, hd, 9, None))


# ------------------------------------------------------------------------------------------------ decode
def bench_decode(batch: int, ctx: int, block_size: int, padded: bool) -> dict[str, Any]:
    """Time decode attention on ``batch`` sequences of ``ctx`` tokens.

    The K/V working set of one call can be far smaller than the 50 MB L2 of an H200, whereas in a real decode
    step every layer reads its own cache once. So the timed graph rotates over ``sets`` independent cache copies
    (>= 256 MB in all) and each call reads K/V that is not L2-resident, as in the engine.
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache, v_cache, bt = make_cache([ctx] * batch, block_size, HKV, D, gen, width_tokens=4096 if padded else None, fill="uniform")
    kv_bytes = 2 * batch * ctx * HKV * D * k_cache.element_size()
    sets = max(1, min(256, math.ceil(256e6 / (2 * k_cache.numel() * k_cache.element_size()))))
    caches = [(k_cache, v_cache)] + [
        (torch.empty_like(k_cache).uniform_(-1, 1), torch.empty_like(v_cache).uniform_(-1, 1)) for _ in range(sets - 1)
    ]
    q = torch.randn(batch, H, D, device="cuda", dtype=DTYPE)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = choose_num_splits(batch, HKV, bt.shape[1] * block_size, sms)
    counter = [0]

    def step() -> None:
        kc, vc = caches[counter[0] % sets]
        counter[0] += 1
        decode_attention_triton(q, kc, vc, bt, lens, D**-0.5, out=out)

    ms, how = bench_ms(step)
    bw = kv_bytes / (ms * 1e-3)
    return {"num_splits": splits, "us": ms * 1e3, "kv_MB": kv_bytes / 1e6, "TB_s": bw / 1e12,
            "pct_peak": 100 * bw / PEAK_BW, "timer": how, "l2_rotation_sets": sets}


def section_decode(r: Runner, quick: bool) -> None:
    batches = [1, 8, 32, 128, 256]
    contexts = [128, 512, 1024, 2048, 4096]
    for bs in [16, 32, 64, 128, 256]:
        for batch in batches:
            for ctx in contexts:
                for padded in ([False] if quick else [False, True]):
                    if padded and (ctx == 4096 or batch > 32):
                        continue  # same as tight (ctx 4096), or the same split count (batch > 32)
                    r.case("decode", {"block_size": bs, "batch": batch, "ctx": ctx, "table": "padded" if padded else "tight"},
                           lambda bs=bs, batch=batch, ctx=ctx, padded=padded: bench_decode(batch, ctx, bs, padded))


# ----------------------------------------------------------------------------------------------- prefill
def causal_pairs(q_len: int, ctx: int) -> int:
    """Number of (query, key) pairs computed by causal attention of the last q_len tokens of a ctx-long context."""
    prefix = ctx - q_len
    return q_len * prefix + q_len * (q_len + 1) // 2


def bench_prefill(q_lens: list[int], ctx_lens: list[int], block_size: int) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache, v_cache, bt = make_cache(ctx_lens, block_size, HKV, D, gen, fill="uniform")
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=DTYPE)
    args = (q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, max(q_lens), max(ctx_lens), D**-0.5)
    out = torch.empty_like(q)
    ms, how = bench_ms(lambda: prefill_attention(*args, out=out))
    flops = 4 * H * D * sum(causal_pairs(a, b) for a, b in zip(q_lens, ctx_lens))
    row: dict[str, Any] = {"us": ms * 1e3, "TFLOP_s": flops / (ms * 1e-3) / 1e12, "pct_peak": 100 * flops / (ms * 1e-3) / PEAK_FLOPS,
                           "Mtok_s": sum(q_lens) / (ms * 1e-3) / 1e6, "timer": how}
    if block_size == 16 and len(set(q_lens)) == 1 and q_lens == ctx_lens:
        # Baseline: torch SDPA (flash backend) on dense [B, H, L, D] K/V, same FLOPs.
        b, length = len(q_lens), q_lens[0]
        qd = torch.randn(b, H, length, D, device="cuda", dtype=DTYPE)
        kd = torch.randn(b, HKV, length, D, device="cuda", dtype=DTYPE)
        vd = torch.randn_like(kd)
        try:
            sdpa_ms, _ = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
            row["sdpa_us"] = sdpa_ms * 1e3
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def section_prefill(r: Runner, quick: bool) -> None:
    shapes = {
        "1x4096": ([4096], [4096]),
        "8x512": ([512] * 8, [512] * 8),
        "32x128": ([128] * 32, [128] * 32),
        "4x1024": ([1024] * 4, [1024] * 4),
        "chunk512_on_3584": ([512], [4096]),
        "16x(64 new on 2048)": ([64] * 16, [2048] * 16),
    }
    for bs in ([16, 256] if quick else [16, 64, 256]):
        for name, (ql, cl) in shapes.items():
            r.case("prefill", {"shape": name, "block_size": bs, "tokens": sum(ql)}, lambda ql=ql, cl=cl, bs=bs: bench_prefill(ql, cl, bs))


# -------------------------------------------------------------------------------------------------- main
def print_tables(rows: list[dict[str, Any]]) -> None:
    dec = [x for x in rows if x["section"] == "decode" and "TB_s" in x]
    if dec:
        print(f"\n=== decode attention bandwidth, TB/s of K/V read (% of {PEAK_BW / 1e12:.1f} TB/s) ===")
        for table in ["tight", "padded"]:
            sub = [x for x in dec if x["table"] == table]
            if not sub:
                continue
            ctxs = sorted({x["ctx"] for x in sub})
            print(f"-- table={table}")
            print(f"{'bs':>4} {'batch':>5} " + " ".join(f"{c:>14}" for c in ctxs))
            for bs in sorted({x["block_size"] for x in sub}):
                for batch in sorted({x["batch"] for x in sub}):
                    cells = []
                    for c in ctxs:
                        m = [x for x in sub if x["block_size"] == bs and x["batch"] == batch and x["ctx"] == c]
                        cells.append(f"{m[0]['TB_s']:.2f} ({m[0]['pct_peak']:.0f}%)" if m else "-")
                    print(f"{bs:>4} {batch:>5} " + " ".join(f"{s:>14}" for s in cells))
        print("\n-- mean % of peak per block size (tight table, ctx >= 1024):")
        for bs in sorted({x["block_size"] for x in dec}):
            v = [x["pct_peak"] for x in dec if x["block_size"] == bs and x["table"] == "tight" and x["ctx"] >= 1024]
            if v:
                print(f"   block_size {bs:>3}: {sum(v) / len(v):.1f}%")
    pre = [x for x in rows if x["section"] == "prefill" and "TFLOP_s" in x]
    if pre:
        print("\n=== prefill attention ===")
        print(f"{'shape':>22} {'bs':>4} {'us':>9} {'TFLOP/s':>8} {'Mtok/s':>7} {'sdpa_us':>8}")
        for x in pre:
            sd = f"{x['sdpa_us']:.1f}" if "sdpa_us" in x else "-"
            print(f"{x['shape']:>22} {x['block_size']:>4} {x['us']:>9.1f} {x['TFLOP_s']:>8.1f} {x['Mtok_s']:>7.2f} {sd:>8}")
    cor = [x for x in rows if x["section"] == "correctness"]
    if cor:
        bad = [x for x in cor if not x.get("ok")]
        worst = max((x.get("rel_err", 0.0) for x in cor), default=0.0)
        print(f"\n=== correctness: {len(cor) - len(bad)}/{len(cor)} ok, worst rel err {worst:.3g} (threshold {TOL})")
        for x in bad:
            print("   FAILED:", format_row(x))
    errs = [x for x in rows if "error" in x]
    if errs:
        print(f"\n{len(errs)} case(s) with errors:")
        for x in errs[:20]:
            print("  ", format_row(x))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--sections", default="correctness,decode,prefill", help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="fewer cases (no padded tables, fewer split counts)")
    p.add_argument("--max-seconds", type=float, default=170.0, help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the attention benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    r = Runner(args.max_seconds)
    sections = {"correctness": section_correctness, "decode": section_decode, "prefill": section_prefill}
    for name in args.sections.split(","):
        name = name.strip()
        if name not in sections:
            print(f"unknown section {name!r}; known: {list(sections)}", file=sys.stderr)
            continue
        print(f"\n##### section {name} (t={time.time() - r.t0:.1f}s)", flush=True)
        try:
            sections[name](r, args.quick)
        except Exception as e:  # noqa: BLE001
            r.rows.append({"section": name, "error": f"section crashed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
    try:
        print_tables(r.rows)
    except Exception:  # noqa: BLE001 - never lose the JSON because of the pretty printer
        traceback.print_exc()
    meta = provenance.run_metadata()
    meta.update({"bench": "attention", "peak_bandwidth_bytes_per_s": PEAK_BW, "peak_bf16_flop_per_s": PEAK_FLOPS,
                 "shapes": {"H": H, "Hkv": HKV, "D": D, "dtype": str(DTYPE)}, "elapsed_s": round(time.time() - r.t0, 1),
                 "skipped_cases": r.skipped, "command": " ".join([sys.executable] + sys.argv)})
    obj = {"meta": meta, "rows": r.rows}
    path = results_io.write_json(args.out, obj)
    print(f"\nwrote {path} ({len(r.rows)} rows, {time.time() - r.t0:.1f}s)")
    n_bad = sum(1 for x in r.rows if x["section"] == "correctness" and not x.get("ok"))
    return 1 if n_bad else 0

