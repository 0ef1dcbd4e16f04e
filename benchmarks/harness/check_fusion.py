"""GPU correctness check of the coconut op and every forced fused variant (bf16 vs a float64 reference), plus a
tiny HF Qwen3 compiled with backend="coconut" vs eager.

Cases: M in {1, 2, 3, 16, 17, 255, 1024, 4097} x (N, K) in {4096, 6144, 151936} x 1024 and odd sizes; with and
without residual and bias. Outputs are NaN-poisoned (the poison_outputs kernel setting) so unwritten elements
fail. For N = 151936 the reference covers every 37th output column (a float64 [4097, 151936] would need 5 GB).
Pass: rel err ||y - ref|| / ||ref|| <= --tol (1e-2), no NaN, h == x + r exactly.

Usage: python benchmarks/check.py --what fusion [--quick] [--part-args 'fusion=--no-autotune']
Prints a table, writes JSON to --out, exits 1 if any case fails (2 without CUDA).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from typing import Any, Optional


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MS = [1, 2, 3, 16, 17, 255, 1024, 4097]
SHAPES = [(4096, 1024), (6144, 1024), (151936, 1024), (1000, 1000), (37, 45), (4097, 1023)]
DEVICE = "cuda"  # module globals so the logic can be exercised on CPU (Triton interpreter, fp16) in tests
DTYPE = torch.bfloat16


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="path of the JSON report")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--quick", action="store_true", help="M in {1, 17, 1024}, shapes qkv and odd only")
    p.add_argument("--no-autotune", action="store_true", help="the autotune kernel setting off for the dispatched op")
    p.add_argument("--skip-model", action="store_true", help="skip the HF Qwen3 compile check")
    return p.parse_args(argv)


def ref64(x: torch.Tensor, r: Optional[torch.Tensor], g: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
          eps: float, cols: slice) -> torch.Tensor:
    """Float64 reference of y[:, cols] for h = x (+ r) rounded to x.dtype (as the model does)."""
    h = (x + r) if r is not None else x
    hd = h.double()
    a = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    return F.linear(a, w[cols].double(), None if b is None else b[cols].double())


def check_case(m: int, n: int, k: int, residual: bool, bias: bool, variants: list[str], tol: float) -> list[dict]:
    from fusion_pass import kernels

    dt = DTYPE
    gen = torch.Generator(device=DEVICE).manual_seed(m * 7 + n)
    x = torch.randn(m, k, device=DEVICE, dtype=dt, generator=gen)
    r = torch.randn(m, k, device=DEVICE, dtype=dt, generator=gen) if residual else None
    g = (1 + 0.2 * torch.randn(k, device=DEVICE, generator=gen)).to(dt)
    w = (torch.randn(n, k, device=DEVICE, generator=gen) * k ** -0.5).to(dt)
    b = (0.1 * torch.randn(n, device=DEVICE, generator=gen)).to(dt) if bias else None
    eps = 1e-6
    cols = slice(None, None, 37) if n > 50000 else slice(None)
    ref = ref64(x, r, g, w, b, eps, cols)
    rows = []
    for v in variants:
        row: dict[str, Any] = {"M": m, "N": n, "K": k, "residual": residual, "bias": bias, "variant": v}
        try:
            if v == "op":
                if residual:
                    *ys, h = torch.ops.coconut.add_rms_norm_linear(x, r, g, [w], [b], eps)
                else:
                    ys, h = torch.ops.coconut.rms_norm_linear(x, g, [w], [b], eps), None
                suffix = f"/{kernels.OP}/M={kernels.m_bucket(m)},N={n},K={k},{str(DTYPE).replace('torch.', '')}"
                table = kernels.dispatch_table()
                row["chosen"] = next((c["variant"] for key, c in table.items() if key.endswith(suffix)), "?")
            else:
                if v in kernels.FUSED_VARIANTS and not kernels.FUSED_VARIANTS[v].configs(m):
                    continue  # outside the variant's range of M (stream / skinny)
                ys, h = kernels.rms_norm_linear(x, g, [w], [b], eps, residual2d=r, variant=v)
            y = ys[0]
            torch.cuda.synchronize() if DEVICE == "cuda" else None
            row["nan"] = bool(torch.isnan(y).any().item())
            yc = y[:, cols].double()
            row["rel_err"] = float(((yc - ref).norm() / ref.norm()).item())
            row["h_exact"] = bool(torch.equal(h, x + r)) if residual else True
            row["ok"] = (not row["nan"]) and row["rel_err"] <= tol and row["h_exact"]
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
        rows.append(row)
    return rows


def check_model(tol: float) -> dict[str, Any]:
    """Tiny HF Qwen3 (2 layers, bf16, CUDA) compiled with coconut vs eager; expects 5 rewritten sites."""
    row: dict[str, Any] = {"variant": "hf_qwen3_tiny_bf16"}
    try:
        import transformers

        import fusion_pass

        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       max_position_embeddings=128, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg).to(DEVICE, DTYPE).eval()
        ids = torch.randint(0, 512, (2, 9), device=DEVICE)
        from torch._inductor import config as ic

        with torch.no_grad(), ic.patch(fx_graph_cache=False):
            ref = model(input_ids=ids, use_cache=False).logits
            fusion_pass.reset_stats()
            torch._dynamo.reset()
            out = torch.compile(lambda t: model(input_ids=t, use_cache=False).logits, backend="coconut")(ids)
        row["sites"] = fusion_pass.fused_site_count()
        row["graphs"] = [{k: s[k] for k in ("sites", "norms_seen", "candidates", "skipped")}
                         for s in fusion_pass.all_stats()]  # why a site was left alone, per compiled graph
        row["rel_err"] = float(((out.double() - ref.double()).norm() / ref.double().norm()).item())
        row["ok"] = row["sites"] == 5 and row["rel_err"] < tol and not torch.isnan(out).any().item()
    except Exception as e:
        row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
    return row


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("the fusion check needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import fusion_pass  # noqa: F401
    from fusion_pass import kernels
    from fusion_pass.settings import configure_kernels

    configure_kernels(poison_outputs=True, autotune=not args.no_autotune)
    t0 = time.time()
    ms = [1, 17, 1024] if args.quick else MS
    shapes = [SHAPES[0], SHAPES[4]] if args.quick else SHAPES
    variants = ["op", "torch", "unfused", "stream", "skinny"]
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        for m in ms:
            for residual, bias in ((True, False), (False, True)):
                for row in check_case(m, n, k, residual, bias, variants, args.tol):
                    rows.append(row)
                    if not row["ok"]:
                        print("FAIL", json.dumps({kk: v for kk, v in row.items() if kk != "traceback"}), flush=True)
        torch.cuda.empty_cache()
    if not args.skip_model:
        rows.append(check_model(args.tol))
    failed = [r for r in rows if not r.get("ok")]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "tol": args.tol,
              "cases": len(rows), "failed": len(failed), "wall_s": round(time.time() - t0, 1),
              "dispatch_table": kernels.dispatch_table(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'variant':20} {'M':>5} {'N':>7} {'K':>5} {'res':>4} {'bias':>4} {'rel_err':>9} {'ok':>4}")
    for r in rows:
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else r.get("error", "")[:40]
        print(f"{r['variant']:20} {r.get('M', ''):>5} {r.get('N', ''):>7} {r.get('K', ''):>5} "
              f"{str(r.get('residual', ''))[:4]:>4} {str(r.get('bias', ''))[:4]:>4} {err:>9} {str(r['ok']):>4}")
    print(f"{len(rows) - len(failed)}/{len(rows)} passed in {report['wall_s']} s -> {args.out}")
    return 1 if failed else 0

