"""Time the fused q/k RMSNorm + RoPE kernel against Inductor's compilation of the model's PyTorch chain.

Qwen3-0.6B's attention shapes (16 q heads, 8 kv heads, head_dim 128, bf16), tokens T in {1, 8, 64, 256, 2048}:

  fused_us     nanovllm.kernels.qk_norm_rope.qk_norm_rope (one Triton program per token)
  inductor_us  torch.compile(qk_norm_rope_ref, dynamic=False) (what the engine's compiled model runs today)
  speedup      inductor_us / fused_us

Both run inside CUDA graphs of `--reps` calls (replayed `--rounds` times, median per call) on the same inputs;
the outputs are compared (bf16: both round in the model's chain, so the max abs difference is reported).

Usage (GPU): python benchmarks/kernels.py --what qk-norm-rope
Writes JSON (meta + rows) to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

from . import provenance, results_io  # noqa: E402

H, HKV, D, MAX_POS = 16, 8, 128, 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,8,64,256,2048")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=results_io.default_out("qk-norm-rope"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the qk-norm-rope benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    from .kernel_gemv import graph_time_us
    from nanovllm.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
    from nanovllm.layers.rotary_embedding import RotaryEmbedding

    dev, dt = "cuda", torch.bfloat16
    rope = RotaryEmbedding(D, MAX_POS, 1_000_000.0).to(dev)
    cs = rope.cos_sin_cache
    qw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
    kw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
    compiled = torch.compile(qk_norm_rope_ref, dynamic=False)
    rows: list[dict[str, Any]] = []
    for t in [int(v) for v in args.tokens.split(",") if v]:
        qkv = torch.randn(t, (H + 2 * HKV) * D, device=dev, dtype=dt)
        pos = torch.randint(0, MAX_POS, (t,), device=dev)
        fused = lambda i: qk_norm_rope(qkv, qw, kw, cs, pos, H, HKV, 1e-6)  # noqa: E731
        ind = lambda i: compiled(qkv, qw, kw, cs, pos, H, HKV, 1e-6)  # noqa: E731
        qa, ka = fused(0)
        qb, kb = ind(0)
        diff = max(float((qa.float() - qb.float()).abs().max()), float((ka.float() - kb.float()).abs().max()))
        tf = graph_time_us(fused, args.reps, args.reps, args.rounds)
        ti = graph_time_us(ind, args.reps, args.reps, args.rounds)
        row = {"tokens": t, "fused_us": round(tf, 3), "inductor_us": round(ti, 3), "speedup": round(ti / tf, 3),
               "max_abs_diff": diff}
        rows.append(row)
        print(row, flush=True)
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    path = results_io.write_json(args.out, {"meta": meta, "shape": {"heads": H, "kv_heads": HKV, "head_dim": D},
                                            "rows": rows})
    print(f"wrote {path}")
    return 0

