"""Kernels against their unfused paths and their bytes floors, on the GPU (CUDA graphs, medians of many replays).

Parts (``--what``, default ``fusion,gemv,attention``). The first three use only the kernels' public entry points
(``harness/kernel_ops.py``), so they measure whatever the kernels are inside:

- ``fusion``: the coconut op (RMSNorm [+ residual add] -> linear in one op, its own dispatch) against Inductor's
  norm + cuBLAS at the Qwen3-0.6B sites (qkv, gate_up, lm_head) for M = 1..1024, in interleaved pairs, each row
  with its bytes floor and its error against float64;
- ``gemv``: the engine's small-M linear (o_proj, down_proj with SwiGLU) against the Inductor-compiled unfused path;
- ``attention``: the engine's paged decode attention against its K/V bytes floor and its reference.

The others measure the kernels' variants and launch configurations, and so use their internals:

- ``fusion-variants``: every variant and launch shape of the fused op per site and M, and the dispatch table;
- ``gemv-variants``: every configuration of the small-M linear against cuBLAS;
- ``attention-full``: correctness, decode bandwidth over batch x context x block size, prefill TFLOP/s;
- ``qk-norm-rope``: the fused q/k RMSNorm + RoPE kernel against the unfused ops;
- ``pdl-chain``: a chain of decode-step kernels with programmatic dependent launch on and off;
- ``host-overhead``: host time per call of the ops a prefill calls from Python;
- ``gemv-sweep``: a sweep of the decode linears' launch configurations (slow; for retuning).

Writes ``benchmarks/results/<gpu>/kernels.json`` (``$OUT/<gpu>/`` when ``OUT`` is set): the header keys, then
``parts`` {name: that part's figures, rc, seconds}.

Usage::

    python benchmarks/kernels.py
    python benchmarks/kernels.py --what fusion --quick
    python benchmarks/kernels.py --what fusion --part-args 'fusion=--sites qkv --ms 1,2'
    python benchmarks/kernels.py --what gemv-sweep --part-args 'gemv-sweep=--budget-s 200'
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    sys.path[0] = os.path.dirname(HERE)  # the repository root, not benchmarks/ (whose profile.py shadows the stdlib)
elif os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.harness import parts  # noqa: E402

BENCH, SCRIPT, DEFAULT = "kernels", "benchmarks/kernels.py", "fusion,gemv,attention"
PARTS: dict[str, parts.Part] = {
    "fusion": parts.Part("kernel_ops", "the coconut op vs norm + cuBLAS", args=("--what", "fusion"),
                         quick_args=("--ms", "1,4,16,256", "--pairs", "5")),
    "gemv": parts.Part("kernel_ops", "the engine's small-M linear vs the unfused path", args=("--what", "gemv"),
                       quick_args=("--ms", "1,4,16", "--pairs", "5")),
    "attention": parts.Part("kernel_ops", "paged decode attention vs its floor", args=("--what", "attention"),
                            quick_args=("--batches", "1,64", "--contexts", "512", "--pairs", "5")),
    "fusion-variants": parts.Part("kernel_fusion", "every fused variant and launch shape", quick_args=("--quick",)),
    "gemv-variants": parts.Part("kernel_gemv", "every small-M linear configuration vs cuBLAS"),
    "attention-full": parts.Part("kernel_attention", "attention correctness, bandwidth grid, prefill",
                                 quick_args=("--quick",)),
    "qk-norm-rope": parts.Part("kernel_qk_norm_rope", "fused q/k norm + RoPE vs unfused"),
    "pdl-chain": parts.Part("kernel_pdl_chain", "programmatic dependent launch on/off"),
    "host-overhead": parts.Part("kernel_host_overhead", "host time per op call"),
    "gemv-sweep": parts.Part("kernel_gemv_sweep", "decode linear launch-config sweep"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; returns 0 when every part succeeded, else 1 (2 for bad flags, from argparse)."""
    return parts.main(__doc__, BENCH, SCRIPT, DEFAULT, PARTS, argv)


if __name__ == "__main__":
    sys.exit(main())
