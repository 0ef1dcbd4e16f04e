"""Kernels against their unfused paths and their bytes floors, on the GPU (CUDA graphs, medians of many replays).

Parts (``--what``, default ``fusion,attention,gemv``):

- ``fusion``: the coconut op (RMSNorm [+ residual add] -> linear in one kernel) against Inductor's norm + cuBLAS at
  the Qwen3-0.6B sites (qkv, gate_up, lm_head) for M = 1..8192, interleaved pairs, each row's bytes floor;
- ``attention``: the engine's paged decode (split + reduce) and prefill attention kernels against a PyTorch
  reference, correctness then time against the K/V bytes floor;
- ``gemv``: the engine's small-M linear (o_proj, down_proj shapes) against cuBLAS;
- ``qk-norm-rope``: the fused q/k RMSNorm + RoPE kernel against the unfused ops;
- ``pdl-chain``: a chain of decode-step kernels with programmatic dependent launch on and off;
- ``host-overhead``: host time per call of the ops a prefill calls from Python;
- ``gemv-sweep``: a sweep of the small-M linear's launch configurations (slow; for retuning).

Writes ``benchmarks/results/<gpu>/kernels.json`` (``$OUT/<gpu>/`` when ``OUT`` is set): the header keys, then
``parts`` {name: that part's figures, rc, seconds}.

Usage::

    python benchmarks/kernels.py
    python benchmarks/kernels.py --what fusion --quick
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

import argparse  # noqa: E402

from benchmarks.harness import parts  # noqa: E402

BENCH, SCRIPT, DEFAULT = "kernels", "benchmarks/kernels.py", "fusion,attention,gemv"
PARTS: dict[str, parts.Part] = {
    "fusion": parts.Part("kernel_fusion", "the coconut op vs norm + cuBLAS", quick_args=("--quick",)),
    "attention": parts.Part("kernel_attention", "paged decode / prefill attention", quick_args=("--quick",)),
    "gemv": parts.Part("kernel_gemv", "the engine's small-M linear vs cuBLAS"),
    "qk-norm-rope": parts.Part("kernel_qk_norm_rope", "fused q/k norm + RoPE vs unfused"),
    "pdl-chain": parts.Part("kernel_pdl_chain", "programmatic dependent launch on/off"),
    "host-overhead": parts.Part("kernel_host_overhead", "host time per op call"),
    "gemv-sweep": parts.Part("kernel_gemv_sweep", "small-M linear launch-config sweep"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; returns 0 when every part succeeded, else 1 (2 for bad flags, from argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parts.add_arguments(ap, PARTS, DEFAULT)
    args = ap.parse_args(argv)
    return parts.run(BENCH, SCRIPT, argv, args, parts.selected(ap, args, PARTS), PARTS)


if __name__ == "__main__":
    sys.exit(main())
