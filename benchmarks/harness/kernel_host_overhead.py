"""Host (CPU) time per call of the ops a prefill launches from Python, and how their registration changes it.

Why: a prefill is not replayed from a CUDA graph, so every op of the compiled model is called from Python and the
host time per call adds up (benchmarks/profile.py --what prefill: a batch-1 512-token prefill of Qwen3-0.6B took 18.8 ms
for 3.9 ms of GPU kernels). The project's ops are defined with ``fusion_pass.registration.define_op``
(``torch.library.Library``) rather than ``torch.library.custom_op``. This script times, side by side in one
process, the same Python kernel behind both registrations, plus the pieces inside the coconut op.

Method: for each case, ``--rounds`` rounds of ``--calls`` back-to-back calls with no synchronization inside a
round (the launch queue absorbs them, so the wall time of a round is the host's time), a device synchronize
between rounds; the host time per call is the median over rounds of round time / calls. Shapes: a prefill of
``--tokens`` rows of Qwen3-0.6B (K = 1024; qkv N = 4096; gate_up N = 6144; down_proj input 2 x 3072; 16 q heads,
8 kv heads, head_dim 128). ``custom_op / define_op`` = the ratio of the two registrations of one kernel. On
CUDA also a decode site (:func:`decode_cases`): the coconut op at M = 1 under inference_mode and under no_grad,
and its fused launch with the direct launch of fusion_pass.launch_cache against Triton's ordinary launch.

Usage: python benchmarks/kernels.py --what host-overhead [--part-args 'host-overhead=--tokens 512 --device cpu']
Writes JSON to ``--out`` (default: the temp folder).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

from . import accelerator, provenance, results_io, tables, timing  # noqa: E402

provenance.add_repo_to_path()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _twin(name: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """`impl` registered with torch.library.custom_op as coconut_bench::<name> (once per process)."""
    if not hasattr(torch.ops.coconut_bench, name):
        torch.library.custom_op(f"coconut_bench::{name}", mutates_args=())(impl).register_fake(fake)
    return getattr(torch.ops.coconut_bench, name).default


def _empty_impl(x: torch.Tensor, ws: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    return [x.new_empty((1,)) for _ in ws]


def _empty_fake(x: torch.Tensor, ws: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    return [x.new_empty((1,)) for _ in ws]


def host_us_per_call(fn: Callable[[], Any], calls: int, rounds: int) -> float:
    """Median over `rounds` of (wall time of `calls` calls of fn) / calls, in microseconds; one untimed call
    first (compilation, caches), a device synchronize between rounds."""
    fn()
    accelerator.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
        accelerator.synchronize()
    return timing.median(times)


def build_cases(tokens: int, device: str, dtype: torch.dtype) -> list[tuple[str, str, Callable[[], Any]]]:
    """(group, case, zero-argument call) for every timed case; `group` names the pair a ratio is taken in."""
    from fusion_pass import kernels, ops
    from fusion_pass.registration import define_op
    from nanovllm.layers import gemv_op, qk_norm_rope_op
    from nanovllm.layers.rotary_embedding import RotaryEmbedding

    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    k, heads, kv_heads, head_dim, inter = 1024, 16, 8, 128, 3072
    x, r, nw = rand(tokens, k), rand(tokens, k), rand(k, scale=0.1) + 1
    w_qkv, w_gu, w_down = rand(4096, k, scale=0.02), rand(2 * inter, k, scale=0.02), rand(k, inter, scale=0.02)
    act = rand(tokens, 2 * inter)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
    qw, kw = rand(head_dim, scale=0.1) + 1, rand(head_dim, scale=0.1) + 1
    cos_sin = RotaryEmbedding(head_dim, 4096, 1_000_000.0).cos_sin_cache.to(device)
    positions = torch.arange(tokens, device=device)

    if not hasattr(torch.ops.coconut_bench, "empty_define_op"):
        define_op("coconut_bench::empty_define_op", _empty_impl, _empty_fake)
    empty_lib = torch.ops.coconut_bench.empty_define_op.default
    empty_twin = _twin("empty_custom_op", _empty_impl, _empty_fake)
    coconut_twin = _twin("add_rms_norm_linear", ops._add_rms_norm_linear, ops._add_rms_norm_linear_fake)
    gemv_twin = _twin("linear_small_m", gemv_op._linear_small_m, gemv_op._linear_small_m_fake)
    qk_twin = _twin("qk_norm_rope", qk_norm_rope_op._qk_norm_rope_impl, qk_norm_rope_op._qk_norm_rope_fake)
    coconut_args = (x, r, nw, [w_qkv], [None], 1e-6)
    qk_args = (qkv, qw, kw, cos_sin, positions, heads, kv_heads, 1e-6)
    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("empty op (dispatch only)", "define_op", lambda: empty_lib(x, [w_qkv], 1e-6)),
        ("empty op (dispatch only)", "custom_op", lambda: empty_twin(x, [w_qkv], 1e-6)),
        ("coconut add_rms_norm_linear qkv", "define_op",
         lambda: torch.ops.coconut.add_rms_norm_linear.default(*coconut_args)),
        ("coconut add_rms_norm_linear qkv", "custom_op", lambda: coconut_twin(*coconut_args)),
        ("coconut add_rms_norm_linear qkv", "python", lambda: ops._add_rms_norm_linear(*coconut_args)),
        ("coconut add_rms_norm_linear gate_up", "define_op",
         lambda: torch.ops.coconut.add_rms_norm_linear.default(x, r, nw, [w_gu], [None], 1e-6)),
        ("nanovllm linear_small_m silu_mul", "define_op",
         lambda: torch.ops.nanovllm.linear_small_m.default(act, w_down, None, "silu_mul")),
        ("nanovllm linear_small_m silu_mul", "custom_op", lambda: gemv_twin(act, w_down, None, "silu_mul")),
        ("nanovllm qk_norm_rope", "define_op", lambda: torch.ops.nanovllm.qk_norm_rope.default(*qk_args)),
        ("nanovllm qk_norm_rope", "custom_op", lambda: qk_twin(*qk_args)),
        ("pieces of the coconut op", "F.linear", lambda: F.linear(x, w_qkv)),
    ]
    if device == "cuda":
        cases.append(("pieces of the coconut op", "triton_rms_norm",
                      lambda: kernels.triton_rms_norm(x, nw, 1e-6, r)))
        cases.append(("pieces of the coconut op", "dispatch decision",
                      lambda: kernels.choose(tokens, 4096, k, dtype, x.device)))
        cases += decode_cases(rand, k)
    return cases


def decode_cases(rand: Callable[..., torch.Tensor], k: int) -> list[tuple[str, str, Callable[[], Any]]]:
    """A decode step's site without CUDA graphs: the q / k / v group of Qwen3-0.6B (N = 2048 + 1024 + 1024) at M = 1
    rows through the coconut op (under inference_mode, and under no_grad as transformers' generate runs it), and
    its fused launch alone, with the kernel's direct launch (fusion_pass.launch_cache) and with Triton's ordinary
    launch."""
    from fusion_pass import kernels
    from fusion_pass.kernels import gemv
    from fusion_pass.launch_cache import LaunchCache

    x1, r1, nw1 = rand(1, k), rand(1, k), rand(k, scale=0.1) + 1
    ws = [rand(n, k, scale=0.02) for n in (2048, 1024, 1024)]
    h1 = torch.empty_like(x1)
    op = torch.ops.coconut.add_rms_norm_linear.default
    kernels.pretune([(1, 4096, k, (2048, 1024, 1024))], dtype=x1.dtype, device=x1.device)
    cfg = kernels.STREAM_CONFIGS[1][0]

    def under_no_grad() -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return op(x1, r1, nw1, ws, [None] * 3, 1e-6)

    direct = gemv._STREAM_LAUNCHES
    ordinary = LaunchCache(direct.kernel)
    ordinary.disabled = True  # every launch through kernel[grid](...)

    def fused(cache: Any) -> Callable[[], Any]:
        def call() -> Any:
            gemv._STREAM_LAUNCHES = cache
            try:
                return kernels.fused_linears(x1, nw1, ws, [None] * 3, 1e-6, r1, h1, "stream", cfg)
            finally:
                gemv._STREAM_LAUNCHES = direct
        return call

    group = "coconut op, decode q/k/v group (M=1)"
    return [(group, "define_op, inference_mode", lambda: op(x1, r1, nw1, ws, [None] * 3, 1e-6)),
            (group, "define_op, no_grad", under_no_grad),
            (group, "fused launch, direct", fused(direct)),
            (group, "fused launch, Triton's", fused(ordinary))]


def check_twins(tokens: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative error between the define_op and custom_op registrations' outputs for each op that has both (0.0
    when they run the same kernel, as they should)."""
    groups: dict[str, dict[str, Callable[[], Any]]] = {}
    for group, case, fn in build_cases(tokens, device, dtype):
        groups.setdefault(group, {})[case] = fn
    out: dict[str, float] = {}
    for group, fns in groups.items():
        if group.startswith("empty") or "define_op" not in fns or "custom_op" not in fns:
            continue
        a, b = fns["define_op"](), fns["custom_op"]()
        a = list(a) if isinstance(a, (list, tuple)) else [a]
        b = list(b) if isinstance(b, (list, tuple)) else [b]
        out[group] = max(float((p.float() - q.float()).norm() / q.float().norm().clamp_min(1e-30))
                         for p, q in zip(a, b))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.calls < 1 or args.rounds < 1:
        ap.error("--tokens, --calls and --rounds must be >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    out = args.out or (results_io.default_out("host-overhead") if args.device == "cuda"
                       else os.path.join(tempfile.gettempdir(), "host-overhead-cpu.json"))
    with torch.inference_mode():
        twins_rel_err = check_twins(min(args.tokens, 64), args.device, dtype)
        rows = [{"group": group, "case": case, "host_us": round(host_us_per_call(fn, args.calls, args.rounds), 2)}
                for group, case, fn in build_cases(args.tokens, args.device, dtype)]
    by = {(r["group"], r["case"]): r["host_us"] for r in rows}
    ratios = {grp: round(by[(grp, "custom_op")] / by[(grp, "define_op")], 3)
              for grp, case in by if case == "custom_op" and (grp, "define_op") in by}
    tables.print_table(["op", "registration / piece", "host us per call"],
                       [[r["group"], r["case"], r["host_us"]] for r in rows],
                       title=f"host time per call, {args.tokens} tokens, {args.device} {dtype}")
    print("custom_op / define_op:", ratios)
    meta = provenance.run_metadata(None if argv is None else [sys.argv[0], *argv])
    path = results_io.write_json(out, {"meta": meta, "tokens": args.tokens, "calls": args.calls, "rounds": args.rounds,
                                       "dtype": str(dtype).replace("torch.", ""), "rows": rows,
                                       "custom_op_over_define_op": ratios, "twins_rel_err": twins_rel_err,
                                       "method": __doc__.split("Method: ")[1].split("\n\n")[0].replace("\n", " ")})
    print(f"wrote {path}")
    return 0

