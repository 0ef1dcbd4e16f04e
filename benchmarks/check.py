"""Correctness on the GPU: the kernels against their references, the engine against transformers.

Parts (``--what``, default ``ops,engine,fusion,fixup``):

- ``ops``: the fused op, the engine's small-M linear and its decode attention through their public entry points,
  bf16 against float64 at the Qwen3-0.6B shapes for M = 1..1024 (relative error < 1e-2; ``harness/kernel_ops.py``
  with ``--no-time``);
- ``fusion``: every variant of the coconut op's kernels against a float64 reference, per shape and M (relative
  error < ``--tol``), and the dispatch table the op uses on this GPU;
- ``fixup``: the split-K kernels' in-kernel reduction under CUDA graphs with programmatic dependent launch, bit
  for bit against the two-kernel path;
- ``engine``: greedy tokens of the engine (eager, and coconut + CUDA graphs) against transformers on a tiny
  float32 model (exact) and on the bf16 checkpoint of ``--model`` (agreeing prefix; with ``--quick`` the bf16
  checkpoint runs eagerly only, sparing the build of a compiled 0.6B engine);
- ``bf16-agreement``: how long bf16 greedy decodes of transformers and the engine agree (``--model``).

Writes ``benchmarks/results/<gpu>/check.json`` (``$OUT/<gpu>/`` when ``OUT`` is set); exit status 1 when a part
fails.

Usage::

    python benchmarks/check.py --model /tmp/qwen3-0.6b
    python benchmarks/check.py --quick --what fusion,fixup
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

BENCH, SCRIPT, DEFAULT = "check", "benchmarks/check.py", "ops,engine,fusion,fixup"
PARTS: dict[str, parts.Part] = {
    "ops": parts.Part("kernel_ops", "public ops vs float64 (bf16)", args=(
        "--no-time", "--ms", "1,2,3,4,8,13,16,17,32,33,64,256,1024"), quick_args=("--batches", "1,64,256")),
    "fusion": parts.Part("check_fusion", "coconut op kernels vs float64", quick_args=("--quick",)),
    "fixup": parts.Part("check_fixup", "split-K fixup under graphs + PDL"),
    "engine": parts.Part("check_engine", "engine vs transformers tokens", needs_model=True,
                         quick_args=("--modes", "eager")),
    "bf16-agreement": parts.Part("check_bf16", "bf16 greedy agreement length", needs_model=True),
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; returns 0 when every part succeeded, else 1 (2 for bad flags, from argparse)."""
    return parts.main(__doc__, BENCH, SCRIPT, DEFAULT, PARTS, argv)


if __name__ == "__main__":
    sys.exit(main())
