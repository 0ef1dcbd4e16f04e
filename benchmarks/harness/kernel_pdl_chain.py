"""Time the batch-1 decode chain of our kernels with and without programmatic dependent launch (PDL).

One decode step of a Qwen3-0.6B-shaped model made of the kernels the engine runs at batch 1 (bf16, 28 layers, each
with its own weights, 840 MB in all, so every GEMV reads from HBM), captured in one CUDA graph:

    fused residual + RMSNorm + qkv ("stream")  ->  q/k norm + RoPE  ->  KV store  ->  split-KV decode attention
    ->  o_proj row GEMV  ->  fused residual + RMSNorm + gate_up ("stream")  ->  down_proj row GEMV with SwiGLU

PDL (fusion_pass/launch.py) lets each kernel start while the previous one runs and load its weights before
waiting. The graph is captured twice, PDL off and on (the pdl kernel setting changed before each capture), replayed
`--rounds` times each in alternation; reported: median ms per step, the ratio, and whether both outputs are bitwise
equal.

``--modes`` adds graphs (PDL on) replayed in the same alternation, for a breakdown of the step by kernel: 'store'
runs q/k norm + RoPE and the KV store as one kernel, as the engine does; 'skip-X' leaves kernel X out (its output a
fixed tensor), so the difference to the full chain is X's share of the step, overlaps included; 'shared' makes
every layer read layer 0's weights and caches, which then stay in L2 (the chain without HBM traffic); 'wide' gives
the attention the engine's block-table width (``--max-model-len`` tokens, so the split count the engine's CUDA
graphs use at batch 1: 64 where the context's own tiles give 9 at 512 tokens). Keys
``ms_<mode>``, ``ratio_pdl_over_<mode>`` and, for modes that compute the same step, ``equal_<mode>`` (bitwise) and
``rel_err_<mode>`` (||out - out_off|| / ||out_off||).

Usage (GPU): python benchmarks/kernels.py --what pdl-chain [--part-args 'pdl-chain=--ctx 512']
        python -m benchmarks.harness.kernel_pdl_chain --modes store,store+skip-attn,store+shared --out FILE
Writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

from . import provenance, results_io  # noqa: E402

LAYERS, HIDDEN, H, HKV, D, INTER, BLOCK = 28, 1024, 16, 8, 128, 3072, 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--out", default=results_io.default_out("pdl-chain"))
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--max-model-len", type=int, default=4096, help="the block-table width of mode 'wide', in tokens")
    p.add_argument("--modes", default="",
                   help="comma-separated extra modes, PDL on, parts joined by '+' (step()'s docstring): 'store', "
                        "'shared', 'wide', 'skip-X', e.g. 'store+skip-attn'")
    p.add_argument("--check-cpu", action="store_true", help="run the chain once on the CPU (TRITON_INTERPRET=1) "
                   "against a float32 PyTorch model of the same layers, then exit (a test of this script)")
    args = p.parse_args(argv)
    if args.check_cpu:
        return check_cpu(args)
    if not torch.cuda.is_available():
        print("the pdl-chain benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    from fusion_pass import kernels as FK
    from nanovllm.kernels import decode_attention_triton, qk_norm_rope, qk_norm_rope_store, store_kvcache
    from nanovllm.kernels import gemv as G
    from nanovllm.layers.rotary_embedding import RotaryEmbedding
    from fusion_pass.settings import configure_kernels

    dev, dt, eps = "cuda", torch.bfloat16, 1e-6
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    L = [dict(wqkv=rnd((H + 2 * HKV) * D, HIDDEN, scale=HIDDEN ** -0.5), wo=rnd(HIDDEN, H * D, scale=(H * D) ** -0.5),
              wgu=rnd(2 * INTER, HIDDEN, scale=HIDDEN ** -0.5), wd=rnd(HIDDEN, INTER, scale=INTER ** -0.5),
              g1=1 + rnd(HIDDEN, scale=0.1), g2=1 + rnd(HIDDEN, scale=0.1), qw=1 + rnd(D, scale=0.1),
              kw=1 + rnd(D, scale=0.1)) for _ in range(args.layers)]
    nblk = (args.ctx + BLOCK - 1) // BLOCK + 1
    kc = [rnd(nblk, BLOCK, HKV, D) for _ in range(args.layers)]
    vc = [rnd(nblk, BLOCK, HKV, D) for _ in range(args.layers)]
    bt = torch.arange(nblk, device=dev, dtype=torch.int32)[None, :]
    width = max(nblk, -(-args.max_model_len // BLOCK))
    bt_wide = torch.full((1, width), -1, device=dev, dtype=torch.int32)
    bt_wide[0, :nblk] = bt[0]
    lens = torch.tensor([args.ctx], device=dev, dtype=torch.int32)
    slot = torch.tensor([args.ctx - 1], device=dev, dtype=torch.int64)
    pos = torch.tensor([args.ctx - 1], device=dev, dtype=torch.int64)
    cs = RotaryEmbedding(D, 4096, 1_000_000.0).to(dev).cos_sin_cache
    x0 = rnd(1, HIDDEN)
    r0 = rnd(1, HIDDEN)

    zero_q = torch.zeros(1, H, D, device=dev, dtype=dt)
    zero_o = torch.zeros(1, H, D, device=dev, dtype=dt)
    zero_gu = torch.zeros(1, 2 * INTER, device=dev, dtype=dt)

    def step(mode: str = "") -> torch.Tensor:
        """One decode step; ``mode`` names variants: 'store' (q/k norm + RoPE with the KV store in one kernel, as
        the engine runs it), 'shared' (every layer reads layer 0's weights and caches: they stay in L2),
        'wide' (the engine's block-table width),
        'skip-X' (kernel X not launched, its output a fixed tensor: X in qkv, qknorm, attn, o, gu, down)."""
        x, res = x0, r0
        skip = {part[5:] for part in mode.split("+") if part.startswith("skip-")}
        for lw, k_cache, v_cache in zip(L, kc, vc):
            if "shared" in mode:
                lw, k_cache, v_cache = L[0], kc[0], vc[0]
            h = torch.empty_like(x)
            if "qkv" in skip:
                qkv, h = L[0]["qkv_out"], x
            else:
                qkv = FK.fused_linear(x, lw["g1"], lw["wqkv"], None, eps, residual2d=res, h_out=h,
                                      variant="stream", config=(4, 4, 4))
            if "qknorm" in skip:
                q = zero_q
            elif "store" in mode:
                q = qk_norm_rope_store(qkv, lw["qw"], lw["kw"], cs, pos, H, HKV, eps, k_cache, v_cache, slot)
            else:
                q, k = qk_norm_rope(qkv, lw["qw"], lw["kw"], cs, pos, H, HKV, eps)
                v = qkv[:, (H + HKV) * D:].view(1, HKV, D)
                store_kvcache(k, v, k_cache, v_cache, slot)
            o = zero_o if "attn" in skip else decode_attention_triton(
                q, k_cache, v_cache, bt_wide if "wide" in mode else bt, lens, D ** -0.5)
            a = x if "o" in skip else G.gemv(o.view(1, H * D), lw["wo"])
            h2 = torch.empty_like(x)
            if "gu" in skip:
                gu, h2 = zero_gu, a
            else:
                gu = FK.fused_linear(a, lw["g2"], lw["wgu"], None, eps, residual2d=h, h_out=h2, variant="stream",
                                     config=(4, 4, 4))
            x, res = (x if "down" in skip else G.gemv(gu, lw["wd"], act="silu_mul")), h2
        return x + res

    L[0]["qkv_out"] = FK.fused_linear(x0, L[0]["g1"], L[0]["wqkv"], None, eps, residual2d=r0,
                                      h_out=torch.empty_like(x0), variant="stream", config=(4, 4, 4))
    results: dict[str, Any] = {}
    graphs, outs = {}, {}
    modes = ["off", "on"] + [m for m in args.modes.split(",") if m]
    for mode in list(modes):
        configure_kernels(pdl=mode != "off")
        variant = "" if mode in ("off", "on") else mode
        try:
            step(variant)  # compile this mode's kernel variants outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs[mode] = step(variant)
            graphs[mode] = g
        except Exception as e:  # noqa: BLE001 - a variant that does not build is reported, not fatal
            print(f"mode {mode}: {type(e).__name__}: {e}", flush=True)
            results[f"error_{mode}"] = f"{type(e).__name__}: {str(e)[:300]}"
            modes.remove(mode)
    configure_kernels(pdl=False)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:
        for _ in range(3):
            graphs[mode].replay()
    torch.cuda.synchronize()
    for _ in range(args.rounds):
        for mode in modes:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[mode].replay()
            b.record()
            b.synchronize()
            times[mode].append(a.elapsed_time(b))
    eager_ref = step()
    results.update({"ctx": args.ctx, "layers": args.layers,
                    "ms_pdl_off": statistics.median(times["off"]), "ms_pdl_on": statistics.median(times["on"]),
                    "outputs_equal": bool(torch.equal(outs["off"], outs["on"])),
                    "graph_equals_eager": bool(torch.equal(outs["off"], eager_ref))})
    results["speedup"] = results["ms_pdl_off"] / results["ms_pdl_on"]
    for m in modes[2:]:
        if "skip" not in m and "shared" not in m:  # 'wide' computes the same step
            results[f"equal_{m}"] = bool(torch.equal(outs["off"], outs[m]))
            ref = outs["off"].float()
            results[f"rel_err_{m}"] = float((outs[m].float() - ref).norm() / ref.norm())
        results[f"ms_{m}"] = statistics.median(times[m])
        results[f"ratio_pdl_over_{m}"] = results["ms_pdl_on"] / results[f"ms_{m}"]
    if any(m.startswith("store+skip-") for m in modes):
        from .timing import copy_bandwidth

        bw = copy_bandwidth()["bytes_per_s"]
        results["copy_bandwidth_tb_s"] = round(bw / 1e12, 4)
        results["per_kernel_us_per_layer"] = per_kernel_breakdown(
            {m: statistics.median(t) for m, t in times.items()}, args.layers, args.ctx, bw)
    print(results, flush=True)
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    path = results_io.write_json(args.out, {"meta": meta, **results})
    print(f"wrote {path}")
    return 0 if results["outputs_equal"] else 1


# kernel of one layer -> (the mode that leaves it out, the bytes it must move at batch 1: bf16 weights, or the K/V
# of ``ctx`` tokens for attention)
CHAIN_KERNELS: dict[str, tuple[str, Any]] = {
    "qkv": ("skip-qkv", lambda ctx: (H + 2 * HKV) * D * HIDDEN * 2),
    "qknorm_rope_store": ("skip-qknorm", lambda ctx: 0),
    "attention": ("skip-attn", lambda ctx: 2 * ctx * HKV * D * 2),
    "o_proj": ("skip-o", lambda ctx: HIDDEN * H * D * 2),
    "gate_up": ("skip-gu", lambda ctx: 2 * INTER * HIDDEN * 2),
    "down": ("skip-down", lambda ctx: HIDDEN * INTER * 2),
}


def per_kernel_breakdown(ms: dict[str, float], layers: int, ctx: int, bytes_per_s: float) -> dict[str, dict]:
    """Each kernel's share of one layer of the step, in us: (median ms of mode 'store' - median ms of
    'store+skip-X') / layers, beside its bytes floor (bytes / ``bytes_per_s``), for the kernels whose mode ran."""
    out = {}
    for name, (skip, nbytes) in CHAIN_KERNELS.items():
        if "store" in ms and f"store+{skip}" in ms:
            out[name] = {"us_per_layer": round((ms["store"] - ms[f"store+{skip}"]) / layers * 1e3, 2),
                         "bytes_floor_us": round(nbytes(ctx) / bytes_per_s * 1e6, 2)}
    return out


def check_cpu(args: argparse.Namespace) -> int:
    """The chain's kernels in the Triton interpreter (fp32, one small layer) against plain PyTorch ops."""
    import torch.nn.functional as F

    from fusion_pass import kernels as FK
    from nanovllm.kernels import decode_attention_triton, qk_norm_rope, qk_norm_rope_ref, store_kvcache
    from nanovllm.kernels import gemv as G

    gen = torch.Generator().manual_seed(0)
    n_h, n_kv, d, hid, inter, ctx = 4, 2, 16, 64, 96, 20
    w = lambda *s: torch.randn(*s, generator=gen) * s[-1] ** -0.5  # noqa: E731
    x, r, g = torch.randn(1, hid, generator=gen), torch.randn(1, hid, generator=gen), 1 + 0.1 * torch.randn(hid)
    wqkv, wo = w((n_h + 2 * n_kv) * d, hid), w(hid, n_h * d)
    h = torch.empty_like(x)
    qkv = FK.fused_linear(x, g, wqkv, None, 1e-6, residual2d=r, h_out=h, variant="stream", config=(4, 4, 4))
    ref_h = x + r
    ref = F.linear(ref_h * torch.rsqrt(ref_h.pow(2).mean(-1, keepdim=True) + 1e-6) * g, wqkv)
    ok = torch.allclose(qkv, ref, atol=1e-4) and torch.equal(h, ref_h)
    cs = torch.randn(64, d)
    pos = torch.tensor([ctx - 1])
    q, k = qk_norm_rope(qkv, torch.ones(d), torch.ones(d), cs, pos, n_h, n_kv, 1e-6, force_triton=True)
    qr, kr = qk_norm_rope_ref(qkv, torch.ones(d), torch.ones(d), cs, pos, n_h, n_kv, 1e-6)
    ok &= torch.allclose(q, qr, atol=1e-5) and torch.allclose(k, kr, atol=1e-5)
    kc, vc = torch.randn(4, BLOCK, n_kv, d), torch.randn(4, BLOCK, n_kv, d)
    v = qkv[:, (n_h + n_kv) * d:].view(1, n_kv, d)
    store_kvcache(k, v, kc, vc, torch.tensor([ctx - 1]))
    bt = torch.arange(4, dtype=torch.int32)[None, :]
    o = decode_attention_triton(q, kc, vc, bt, torch.tensor([ctx], dtype=torch.int32), d ** -0.5)
    kk, vv = kc.view(-1, n_kv, d)[:ctx], vc.view(-1, n_kv, d)[:ctx]
    att = torch.softmax(torch.einsum("hd,thd->ht", q[0], kk.repeat_interleave(n_h // n_kv, 1)) * d ** -0.5, -1)
    o_ref = torch.einsum("ht,thd->hd", att, vv.repeat_interleave(n_h // n_kv, 1))
    ok &= torch.allclose(o[0], o_ref, atol=1e-4)
    a = G.gemv(o.view(1, n_h * d), wo, force_triton=True)
    ok &= torch.allclose(a, F.linear(o.view(1, n_h * d), wo), atol=1e-4)
    wd = w(hid, inter)
    gu = torch.randn(1, 2 * inter, generator=gen)
    y = G.gemv(gu, wd, act="silu_mul", force_triton=True)
    ok &= torch.allclose(y, F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd), atol=1e-4)
    print("check-cpu", "OK" if ok else "FAILED")
    return 0 if ok else 1



if __name__ == "__main__":
    raise SystemExit(main())
